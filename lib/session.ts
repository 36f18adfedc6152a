import type { FastifyBaseLogger } from 'fastify'
import type { PoolClient, QueryConfig, QueryResult, QueryResultRow, Submittable as PgSubmittable } from 'pg'
import { requestCancel } from './cancel.js'
import type { Taken } from './checkout.js'
import {
  FST_REQUEST_DB_CLOSING,
  FST_REQUEST_DB_COMMIT_FAILED,
  FST_REQUEST_DB_CONNECTION_LOST,
  FST_REQUEST_DB_TRANSACTION_STATEMENT
} from './errors.js'
import type { ClientHolder } from './held-clients.js'
import type { LeaseActivity } from './observability/lease-activity.js'
import { type ClientGate, isConnectionError } from './pool.js'
import { changesSessionState } from './session-state.js'
import { failSubmittable, isSubmittable, type Submittable, submittableText, whenSubmittableDone } from './streams.js'
import { runTransaction, type TransactionHost } from './transaction.js'
import { savepointName, type TransactionStatement, transactionStatement } from './transaction-control.js'

/** Queries on one connection: what `app.db.transaction` and `request.db.transaction` hand to `fn`. */
export interface DbSession {
  /**
   * Stream a statement's rows on this connection: pass a pg "submittable" (pg-query-stream,
   * pg-cursor, pg-copy-streams' copyTo/copyFrom) and get it back, as pg's `client.query` does.
   */
  query<S extends PgSubmittable> (stream: S): S
  /** Run a statement; rows are typed by the generic. */
  query<R extends QueryResultRow = any, V extends unknown[] = unknown[]> (
    text: string | QueryConfig<V>, values?: V
  ): Promise<QueryResult<R>>
  /** BEGIN … COMMIT around `fn`; ROLLBACK and rethrow if it throws. Nested calls use SAVEPOINTs. */
  transaction<T> (fn: (tx: this) => Promise<T> | T): Promise<T>
}

// How long a cancelled statement may take to stop before its connection is closed instead.
export const CANCEL_GRACE_MS = 2000

// Statements of the plugin's own (BEGIN/COMMIT of a transaction it runs, savepoints): sent as they
// are, never read as a user's transaction statement (transaction-control.ts).
const kOwn = Symbol('fastify-request-db.own-statement')
type OwnStatement = QueryConfig & { [kOwn]: true }
export function own (text: string): OwnStatement {
  return { text, [kOwn]: true }
}
const OWN_BEGIN = own('BEGIN')
const OWN_COMMIT = own('COMMIT')
const OWN_ROLLBACK = own('ROLLBACK')
export const OWN = { BEGIN: OWN_BEGIN, COMMIT: OWN_COMMIT, ROLLBACK: OWN_ROLLBACK }

/**
 * One pool client held for a while, and the books on it: statements in flight, open transactions,
 * whether the session was changed (then the connection is closed, not reused) or broke.
 */
export class Session implements ClientHolder, TransactionHost<Session>, DbSession {
  readonly countsAsLease: boolean = false
  /** The client queries go to; null when none is held (or no longer usable). */
  protected current: PoolClient | null = null
  protected readonly gate: ClientGate
  txDepth = 0
  protected pending = 0
  /** A statement changed the session (SET, temp table, lock…): the connection is closed, not reused. */
  protected dirty = false
  /** A named prepared statement ran: pg re-prepares on a new connection, but the rule stays simple. */
  protected namedStatements = false
  /** The connection must not be used again (it failed, or was sent a cancel): why, for the error. */
  protected broken = false
  private brokenBecause = ''
  /** The raw client was handed to user code (request.db.client()). */
  protected rawHandedOut = false
  /** Shutdown cancelled this session's statements: their errors become FST_REQUEST_DB_CLOSING. */
  protected shutdownCancel = false
  /** Streams (submittables) not over yet on the connection, each with what ends its count. */
  protected openStreams: Map<Submittable, () => void> | null = null
  /** Depths at which a BEGIN sent as a statement opened a level: its COMMIT/ROLLBACK may end it. */
  private plainLevels: number[] | null = null
  private settled: (() => void) | null = null
  /** A request's books for leak detection and timing (lib/observability/); null when both are off. */
  activity: LeaseActivity | null = null

  constructor (gate: ClientGate) {
    this.gate = gate
  }

  get tx (): this {
    return this
  }

  query<S extends PgSubmittable> (stream: S): S
  query<R extends QueryResultRow = any, V extends unknown[] = unknown[]> (text: string | QueryConfig<V>, values?: V): Promise<QueryResult<R>>
  query (text: string | QueryConfig | PgSubmittable, values?: unknown[]): Promise<QueryResult> | PgSubmittable {
    if (typeof text === 'object' && isSubmittable(text)) return this.submit(text)
    const client = this.current
    if (client === null) return this.queryWithoutClient(text as string | QueryConfig, values)
    return this.send(client, text as string | QueryConfig, values)
  }

  transaction<T> (fn: (tx: this) => Promise<T> | T): Promise<T> {
    return runTransaction<this, T>(this, fn)
  }

  async control (sql: string): Promise<void> {
    const result = await this.query(sql === 'BEGIN' ? OWN_BEGIN : sql === 'COMMIT' ? OWN_COMMIT : own(sql))
    const notDone = sql === 'COMMIT' ? notCommitted(result) : null
    if (notDone !== null) throw notDone
  }

  /** Forget every open level: the transaction ended as a whole (route COMMIT/ROLLBACK, release). */
  protected transactionEnded (): void {
    this.txDepth = 0
    this.plainLevels = null
  }

  rollbackFailed (rollbackError: unknown, cause: unknown): void {
    this.markBroken('ROLLBACK failed, so the state of its transaction is unknown')
    this.logger.error({ err: rollbackError, cause }, 'fastify-request-db: ROLLBACK failed; the connection will be closed')
  }

  connectionFailed (err: Error): void {
    // pg reports one failure twice (the server's FATAL message, then the socket's end): log it once.
    if (this.broken) return
    this.markBroken(this.wouldLose() ?? 'it failed while a statement ran')
    this.logger.warn({ err: this.loggable(err) }, 'fastify-request-db: a held database connection failed')
  }

  /** Where this session's log lines go: the app's logger (a request's lease uses the request's). */
  protected get logger (): FastifyBaseLogger {
    return this.gate.log
  }

  /** An error as it may be logged: its message redacted, no stack or driver internals. */
  protected loggable (err: Error): { type: string, message: string, code?: string } {
    return { type: err.name, message: this.gate.redact(err.message), code: (err as { code?: string }).code }
  }

  /**
   * What going on over a new connection would silently lose, or null when nothing would: nothing
   * set in this session lives on the connection. (What a request set before its connection broke
   * is gone with it: a new connection would run the next statement with the default search_path,
   * the login role, no lock, no temp table — another tenant's rows, or a lock it no longer holds.)
   */
  protected wouldLose (): string | null {
    if (this.txDepth > 0) return 'a transaction was open, and its work is gone'
    if (this.rawHandedOut) return 'request.db.client() was in use, so what it changed is unknown'
    if (this.dirty) return 'the session had been changed (SET, set_config, a role, a lock, a temporary table, LISTEN, PREPARE or a cursor), and a new connection would run without it'
    if (this.namedStatements) return 'it had named prepared statements'
    return null
  }

  protected markBroken (because: string): void {
    if (!this.broken) this.brokenBecause = because
    this.broken = true
  }

  /** `app.db` work is the app's own: nobody to go away. (A request's lease overrides this.) */
  checkStillWanted (): void {}

  forceRelease (): void {
    this.shutdownCancel = true
    const client = this.current
    this.markBroken('the server is shutting down')
    if (client !== null && this.isBusy()) this.cancel(client)
  }

  /** Cancel what runs on `client`, on the server. */
  protected cancel (client: PoolClient): void {
    // A cancel is a signal to the backend, delivered whenever it arrives: if the statement ended
    // first, it would hit whatever that connection runs next, another request's statement. So a
    // connection that was sent one is closed, never reused.
    this.markBroken('its statement was cancelled')
    void requestCancel(client as never)
  }

  /** Take a client now (for `app.db`). */
  async open (): Promise<void> {
    this.current = await this.gate.acquire(this)
  }

  /** Give the client back once nothing runs on it. Never throws. */
  async close (): Promise<void> {
    const client = this.current
    if (client === null) return
    this.current = null
    await this.giveBack(client, false)
  }

  protected queryWithoutClient (_text: string | QueryConfig, _values?: unknown[]): Promise<any> {
    return Promise.reject(new Error('fastify-request-db: this session is over'))
  }

  /** Call `then` with the session's client. (A request's lease takes one at first use.) */
  protected withClient (then: Taken): void {
    const client = this.current
    if (client !== null) then(null, client)
    else then(new Error('fastify-request-db: this session holds no connection'))
  }

  /** Hand a stream its statement on this connection, and count it in flight until it is over. */
  private submit<S extends Submittable> (sub: S): S {
    this.withClient((err, client) => {
      if (err !== null) failSubmittable(sub, err)
      else this.startStream(client as PoolClient, sub)
    })
    return sub
  }

  private startStream (client: PoolClient, sub: Submittable): void {
    if (this.broken) {
      failSubmittable(sub, this.brokenError())
      return
    }
    const sql = submittableText(sub)
    if (sql !== undefined && !this.dirty && changesSessionState(sql)) this.dirty = true
    const open = this.openStreams ??= new Map()
    const activity = this.activity
    if (activity !== null) activity.statementStarted(sub)
    let counted = true
    const over = (): void => {
      if (!counted) return
      counted = false
      open.delete(sub)
      if (activity !== null) activity.statementEnded()
      this.statementEnded()
    }
    open.set(sub, over)
    this.pending++
    whenSubmittableDone(sub, (connectionError) => {
      if (connectionError !== null) this.statementError(connectionError)
      over()
    })
    try {
      client.query(sub as never)
    } catch (err) {
      over()
      failSubmittable(sub, err as Error)
    }
  }

  /** The connection was cut under its streams: none of them will hear from it again. */
  protected forgetStreams (): void {
    if (this.openStreams !== null) for (const over of [...this.openStreams.values()]) over()
  }

  protected send<R extends QueryResultRow> (client: PoolClient, text: string | QueryConfig, values?: unknown[]): Promise<QueryResult<R>> {
    return new Promise((resolve, reject) => this.dispatch(client, text, values, resolve, reject))
  }

  /**
   * `send` without its promise, for callers that already have one to settle (or none: onSend's
   * COMMIT). `resolve` runs once the connection is ready again; `reject` a microtask after pg
   * reports the failure, because pg reports it as soon as the server's error arrives, mid-way
   * through the message and with a stale transaction status, and a caller may go on to release
   * the client or send a response from there.
   */
  protected dispatch (client: PoolClient, text: string | QueryConfig, values: unknown[] | undefined, resolve: (result: any) => void, reject: (err: Error) => void): void {
    if (this.broken) {
      // Never over a new connection: what this session had set would be missing there (wouldLose).
      reject(this.brokenError())
      return
    }
    let sql: string
    if (typeof text === 'string') {
      sql = text
    } else {
      if ((text as Partial<OwnStatement>)[kOwn] === true) {
        this.run(client, text, undefined, resolve, reject)
        return
      }
      sql = text.text
      if (text.name !== undefined) this.namedStatements = true
    }
    if (!this.dirty && changesSessionState(sql)) this.dirty = true
    const kind = transactionStatement(sql)
    if (kind !== null) this.runTransactionStatement(client, kind, text, values, resolve, reject)
    else this.run(client, text, values, resolve, reject)
  }

  /**
   * A BEGIN/COMMIT/ROLLBACK the user (or a query builder) sent. Outside any transaction it goes as
   * it is, and the books follow it. Inside one, a bare BEGIN opens a savepoint, and the COMMIT or
   * ROLLBACK that closes a level a statement opened releases it or rolls back to it; one that would
   * end a level the plugin opened (the route's transaction, `transaction()`) is refused.
   */
  private runTransactionStatement (client: PoolClient, kind: TransactionStatement, text: string | QueryConfig, values: unknown[] | undefined, resolve: (result: any) => void, reject: (err: Error) => void): void {
    const depth = this.txDepth
    const levels = this.plainLevels
    const ownsLevel = levels !== null && levels[levels.length - 1] === depth
    let sql: string | null = null
    let after: number
    if (kind === 'begin' || kind === 'begin-with-options') {
      after = depth + 1
      if (depth > 0) {
        if (kind === 'begin-with-options') {
          reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT('a BEGIN with options inside a transaction: a savepoint keeps the isolation level and access mode of the transaction around it'))
          return
        }
        sql = `SAVEPOINT ${savepointName(depth)}`
      }
    } else {
      after = depth === 0 ? 0 : depth - 1
      if (depth > 0 && !ownsLevel) {
        reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT(`${kind === 'rollback' ? 'ROLLBACK' : 'COMMIT'} would end a transaction it did not begin (the route's, or transaction()'s): return to commit it, throw to roll it back`))
        return
      }
      if (depth > 1) {
        const name = savepointName(depth - 1)
        if (kind === 'commit') sql = `RELEASE SAVEPOINT ${name}`
        else if (kind === 'rollback') sql = `ROLLBACK TO SAVEPOINT ${name}; RELEASE SAVEPOINT ${name}`
        else {
          reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT('AND CHAIN inside a nested transaction'))
          return
        }
      }
    }
    const sentAsIs = sql === null
    this.run(client, sentAsIs ? text : sql as string, sentAsIs ? values : undefined, (result) => {
      this.levelChanged(after)
      resolve(result)
    }, (err) => {
      // A failed COMMIT or ROLLBACK of a real transaction ends it all the same (the server rolls back).
      if (sentAsIs && after < depth) this.levelChanged(after)
      reject(err)
    })
  }

  private levelChanged (depth: number): void {
    if (depth === 0) {
      this.transactionEnded()
      return
    }
    if (depth > this.txDepth) (this.plainLevels ??= []).push(depth)
    else this.plainLevels?.pop()
    this.txDepth = depth
  }

  /** Send a statement as it is, counted in flight until pg answers. */
  private run (client: PoolClient, text: string | QueryConfig, values: unknown[] | undefined, resolve: (result: any) => void, reject: (err: Error) => void): void {
    this.pending++
    // Read again where it ends rather than captured: set before a session's first statement and
    // never unset, and the callback's closure stays as small as it was.
    if (this.activity !== null) this.activity.statementStarted(text)
    // pg's callback form: its promise form adds two promises and a closure per statement, which
    // the benchmark's allocation count showed on every request.
    try {
      client.query(text as string, values as unknown[], (err: Error | null, result: QueryResult) => {
        if (this.activity !== null) this.activity.statementEnded()
        this.statementEnded()
        if (err === null || err === undefined) {
          resolve(result)
          return
        }
        const error = this.statementError(err)
        queueMicrotask(() => reject(error))
      })
    } catch (err) {
      // pg throws at once only for a query it could not queue (no text, say): nothing is in flight.
      if (this.activity !== null) this.activity.statementEnded()
      this.statementEnded()
      reject(err as Error)
    }
  }

  private statementEnded (): void {
    if (--this.pending === 0 && this.settled !== null) this.settled()
  }

  protected statementError (err: Error): Error {
    if (this.shutdownCancel) return new FST_REQUEST_DB_CLOSING({ cause: err })
    if (isConnectionError(err)) {
      // The statement may have run before the connection broke: it is never sent again.
      this.markBroken(`it failed while a statement ran (${this.gate.redact(err.message)})`)
      return new FST_REQUEST_DB_CONNECTION_LOST(this.gate.redact(err.message), { cause: err })
    }
    return err
  }

  /** What a statement gets once the connection can't be used. */
  protected brokenError (): Error {
    if (this.shutdownCancel) return new FST_REQUEST_DB_CLOSING()
    return new FST_REQUEST_DB_CONNECTION_LOST(this.brokenBecause)
  }

  /** Might a statement be running? Statements a user runs on the raw client are not counted. */
  protected isBusy (): boolean {
    return this.pending > 0 || this.rawHandedOut
  }

  /** End a `whenSettled` wait now, statements or not (shutdown's last resort). */
  protected stopWaiting (): void {
    if (this.settled !== null) this.settled()
  }

  /** Resolves when no statement of ours is in flight, or after `ms`, or on `stopWaiting()`. */
  protected whenSettled (ms: number): Promise<void> {
    if (this.pending === 0) return Promise.resolve()
    return new Promise((resolve) => {
      const timer = ms === Number.POSITIVE_INFINITY ? null : setTimeout(done, ms)
      const self = this
      function done (): void {
        if (timer !== null) clearTimeout(timer)
        self.settled = null
        resolve()
      }
      this.settled = done
    })
  }

  /**
   * Return the client to the pool in a state the next user can trust: a transaction left open is
   * rolled back; a connection that broke, changed its session, or still runs something is closed.
   */
  protected giveBack (client: PoolClient, closeConnection: boolean, poolRelease?: PoolClient['release']): Promise<void> | undefined {
    const destroy = closeConnection || this.broken || this.dirty || this.isBusy()
    this.transactionEnded()
    // Synchronous in the common case (nothing open, nothing changed): no promise per request.
    if (!destroy && this.transactionStatus(client) !== 'I') return this.rollBackThenRelease(client, poolRelease)
    this.releaseClient(client, destroy, poolRelease)
    return undefined
  }

  private async rollBackThenRelease (client: PoolClient, poolRelease?: PoolClient['release']): Promise<void> {
    let destroy = false
    try {
      await client.query('ROLLBACK')
    } catch {
      destroy = true
    }
    this.releaseClient(client, destroy, poolRelease)
  }

  private releaseClient (client: PoolClient, destroy: boolean, poolRelease?: PoolClient['release']): void {
    if (this.activity !== null) this.activity.released()
    try {
      this.gate.release(this, client, destroy, poolRelease)
    } catch (err) {
      this.logger.error({ err }, 'fastify-request-db: giving a client back failed')
    }
  }

  private transactionStatus (client: PoolClient): string {
    // pg >= 8.21 tracks the server's own answer (ReadyForQuery); older or foreign clients: our count.
    const status = typeof client.getTransactionStatus === 'function' ? client.getTransactionStatus() : null
    return status ?? (this.txDepth > 0 ? 'T' : 'I')
  }
}

/**
 * COMMIT of a transaction in which a statement failed rolls back and reports success: the command
 * tag is the only sign. The caller caught that statement's error; it must not see "committed".
 * Returns the error to report, or null when COMMIT committed.
 */
export function notCommitted (result: QueryResult): Error | null {
  return result.command === 'ROLLBACK'
    ? new FST_REQUEST_DB_COMMIT_FAILED('a statement in the transaction failed, so it was rolled back')
    : null
}
