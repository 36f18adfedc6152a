import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import type { PoolClient, QueryConfig, QueryResult, QueryResultRow, Submittable as PgSubmittable } from 'pg'
import { requestCancel } from './cancel.js'
import type { Taken } from './checkout.js'
import { now } from './clock.js'
import {
  FST_REQUEST_DB_CLOSING,
  FST_REQUEST_DB_COMMIT_FAILED,
  FST_REQUEST_DB_CONNECTION_LOST,
  FST_REQUEST_DB_TRANSACTION_STATEMENT
} from './errors.js'
import type { ClientHolder } from './held-clients.js'
import { cancelChannel, type DestroyReason, publishEnd, queryChannel, type QueryMessage } from './observability/channels.js'
import type { LeaseActivity } from './observability/lease-activity.js'
import { type ClientGate, isConnectionError } from './pool.js'
import { type LoggableError, loggableError } from './redact.js'
import { changesSessionState } from './session-state.js'
import { cutConnection, failSubmittable, isSubmittable, type Submittable, submittableText, tryCloseCursor, whenSubmittableDone } from './streams.js'
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

// How long a stream being stopped may take before its connection is closed under it.
const STOP_STREAM_MS = 1000

// Statements of the plugin's own (BEGIN/COMMIT of a transaction it runs, savepoints): sent as they
// are, never read as a user's transaction statement (transaction-control.ts).
const kOwn = Symbol('fastify-request-db.own-statement')
type OwnStatement = QueryConfig & { [kOwn]: true }
function own (text: string): OwnStatement {
  return { text, [kOwn]: true }
}
export const OWN = { BEGIN: own('BEGIN'), COMMIT: own('COMMIT'), ROLLBACK: own('ROLLBACK') } as const

/** Mark a statement as the plugin's own (a database context's BEGIN, request-context.ts). */
export function markOwn<T extends QueryConfig> (statement: T): T {
  (statement as T & { [kOwn]: true })[kOwn] = true
  return statement
}

/**
 * Checks each statement of a session with a database context before it is sent
 * (request-context.ts): a statement that would change the context's identity is refused.
 */
export interface StatementGuard {
  /** The context could not be applied: every use of the session fails with this. */
  readonly failure: Error | null
  /** The error to refuse `sql` with, or null to send it. */
  refuse (sql: string): Error | null
}

/**
 * One pool client held for a while, and the books on it: statements in flight, open transactions,
 * whether the session was changed (then the connection is closed, not reused) or broke.
 */
export class Session implements ClientHolder, TransactionHost<Session>, DbSession {
  // A getter, not a field: a field redefined by the subclass costs every request a redefinition.
  get countsAsLease (): boolean {
    return false
  }

  /** The request this session serves: none for `app.db` (a request's lease sets it). */
  readonly request: FastifyRequest | null = null
  /** The client queries go to; null when none is held (or no longer usable). */
  protected current: PoolClient | null = null
  /**
   * The route's BEGIN is on the wire (a request's lease): statements wait for its answer in the
   * lease's queue instead of pg's, so none can run before the transaction and its context are
   * open, even should that BEGIN fail (context-statement.ts).
   */
  protected opening = false
  protected readonly gate: ClientGate
  private depth = 0
  protected pending = 0
  /** A statement changed the session (SET, temp table, lock…): the connection is closed, not reused. */
  protected dirty = false
  /** A named prepared statement ran: pg re-prepares on a new connection, but the rule stays simple. */
  protected namedStatements = false
  /** The connection must not be used again (it failed, or was sent a cancel): why, for the error. */
  protected broken = false
  private brokenBecause = ''
  private brokenKind: DestroyReason = 'failed'
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
  /** The database context's check on statements (request-context.ts); null without a context. */
  guard: StatementGuard | null = null

  constructor (gate: ClientGate) {
    this.gate = gate
  }

  get tx (): this {
    return this
  }

  /**
   * Transactions and savepoints open on the connection. Set by runTransaction and the route's
   * transaction as well as by statements: a level closed by either takes with it every level a
   * statement opened inside it.
   */
  get txDepth (): number {
    return this.depth
  }

  set txDepth (depth: number) {
    this.depth = depth
    const levels = this.plainLevels
    if (levels !== null) {
      while (levels.length > 0 && levels[levels.length - 1] > depth) levels.pop()
      if (levels.length === 0) this.plainLevels = null
    }
  }

  query<S extends PgSubmittable> (stream: S): S
  query<R extends QueryResultRow = any, V extends unknown[] = unknown[]> (text: string | QueryConfig<V>, values?: V): Promise<QueryResult<R>>
  query (text: string | QueryConfig | PgSubmittable, values?: unknown[]): Promise<QueryResult> | PgSubmittable {
    if (typeof text === 'object' && isSubmittable(text)) return this.submit(text)
    const client = this.current
    if (client === null || this.opening) return this.queryWithoutClient(text as string | QueryConfig, values)
    return this.send(client, text as string | QueryConfig, values)
  }

  transaction<T> (fn: (tx: this) => Promise<T> | T): Promise<T> {
    return runTransaction<this, T>(this, fn)
  }

  async control (sql: string): Promise<void> {
    // A cursor left open inside transaction(fn) would hold its COMMIT back for ever (pg queues
    // every statement behind an open portal); fn is over, so nobody will read it.
    if (sql !== 'BEGIN' && !sql.startsWith('SAVEPOINT') && this.current !== null && this.openStreams !== null && this.openStreams.size > 0) {
      await this.stopStreams(this.current)
    }
    const result = await this.query(sql === 'BEGIN' ? OWN.BEGIN : sql === 'COMMIT' ? OWN.COMMIT : own(sql))
    const notDone = sql === 'COMMIT' ? notCommitted(result) : null
    if (notDone !== null) throw notDone
  }

  /** Forget every open level: the transaction ended as a whole (route COMMIT/ROLLBACK, release). */
  protected transactionEnded (): void {
    this.depth = 0
    this.plainLevels = null
  }

  rollbackFailed (rollbackError: unknown, cause: unknown): void {
    this.markBroken('ROLLBACK failed, so the state of its transaction is unknown', 'rollback-failed')
    this.logger.error({ err: rollbackError, cause }, 'fastify-request-db: ROLLBACK failed; the connection will be closed')
  }

  connectionFailed (err: Error): void {
    // pg reports one failure twice (the server's FATAL message, then the socket's end): log it once.
    if (this.broken) return
    this.markBroken(this.wouldLose() ?? 'it failed while a statement ran', 'failed')
    this.logger.warn({ err: this.loggable(err) }, 'fastify-request-db: a held database connection failed')
  }

  /** Where this session's log lines go: the app's logger (a request's lease uses the request's). */
  protected get logger (): FastifyBaseLogger {
    return this.gate.log
  }

  /** An error as it may be logged: its message redacted, no stack or driver internals. */
  protected loggable (err: Error): LoggableError {
    return loggableError(err, this.gate.redact)
  }

  /**
   * What going on over a new connection would silently lose, or null when nothing would: nothing
   * set in this session lives on the connection. (What a request set before its connection broke
   * is gone with it: a new connection would run the next statement with the default search_path,
   * the login role, no lock, no temp table — another tenant's rows, or a lock it no longer holds.)
   */
  protected wouldLose (): string | null {
    // Also the server's own word (its last ReadyForQuery): a BEGIN inside a multi-statement text,
    // or COMMIT AND CHAIN, opens a transaction the books may not show.
    const status = this.current?.getTransactionStatus?.()
    if (this.depth > 0 || status === 'T' || status === 'E') return 'a transaction was open, and its work is gone'
    if (this.rawHandedOut) return 'request.db.client() was in use, so what it changed is unknown'
    if (this.dirty) return 'the session had been changed (SET, set_config, a role, a lock, a temporary table, LISTEN, PREPARE or a cursor), and a new connection would run without it'
    if (this.namedStatements) return 'it had named prepared statements'
    return null
  }

  protected markBroken (because: string, kind: DestroyReason): void {
    if (!this.broken) {
      this.brokenBecause = because
      this.brokenKind = kind
    }
    this.broken = true
  }

  /** `app.db` work is the app's own: nobody to go away. (A request's lease overrides this.) */
  checkStillWanted (): void {}

  forceRelease (): void {
    this.shutdownCancel = true
    const client = this.current
    this.markBroken('the server is shutting down', 'shutdown')
    if (client !== null && this.isBusy()) this.cancel(client, 'the server is shutting down')
  }

  /** Cancel what runs on `client`, on the server; `because` is for the log. */
  protected cancel (client: PoolClient, because: string): void {
    // A cancel is a signal to the backend, delivered whenever it arrives: if the statement ended
    // first, it would hit whatever that connection runs next, another request's statement. So a
    // connection that was sent one is closed, never reused.
    this.markBroken('its statement was cancelled', 'cancelled')
    this.quietStreams()
    if (cancelChannel.hasSubscribers) cancelChannel.publish({ pool: this.gate.pool, request: this.request })
    this.logger.debug({ pid: (client as { processID?: number }).processID, because },
      'fastify-request-db: cancelling a running statement; its connection will be closed')
    void requestCancel(client as never)
  }

  /**
   * Stop streams nobody will read: a cursor closes its portal (the statement ends on the server and
   * the connection stays reusable); anything else, or a cursor that does not close in time, loses
   * the connection. Its backend may be blocked writing rows to a socket nobody reads, which a
   * CancelRequest does not reach, so the socket is closed too; the cancel stops work that had not
   * reached the socket yet.
   */
  protected async stopStreams (client: PoolClient): Promise<void> {
    const streams = this.openStreams as Map<Submittable, () => void>
    let cursors = 0
    for (const sub of streams.keys()) if (tryCloseCursor(sub)) cursors++
    if (cursors > 0) await this.whenSettled(STOP_STREAM_MS)
    if (streams.size === 0) return
    this.cancel(client, 'a stream nobody reads')
    cutConnection(client)
    this.forgetStreams()
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
    const refused = this.guard?.refuse(sql ?? '') ?? null
    if (refused !== null) {
      failSubmittable(sub, refused)
      return
    }
    if (sql !== undefined && (!this.dirty || this.gate.pooler !== null) && changesSessionState(sql)) {
      const pooled = this.gate.pooler
      if (pooled === null) {
        this.dirty = true
      } else {
        // A stream's text can't be rewritten: only what the pooler lets through as it is runs.
        const sent = pooled.statement(sql, this.depth > 0 || this.transactionStatus(client) !== 'I')
        if (sent !== sql) {
          failSubmittable(sub, typeof sent === 'string' ? pooled.streamRefused() : sent)
          return
        }
      }
    }
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
    const message = queryChannel.hasSubscribers ? this.queryStarted(sql ?? '', true) : null
    whenSubmittableDone(sub, (connectionError) => {
      if (connectionError !== null) this.statementError(connectionError)
      over()
      if (message !== null) queryEnded(message, connectionError, undefined)
    })
    try {
      client.query(sub as never)
    } catch (err) {
      over()
      failSubmittable(sub, err as Error)
    }
  }

  /**
   * The plugin is about to fail the open streams itself (a cancel, a cut connection): a stream
   * nobody listens to for errors (`rows.pipe(out)` leaves its source unwatched) would crash the
   * process with the error we cause. Logged instead.
   */
  protected quietStreams (): void {
    if (this.openStreams === null) return
    for (const sub of this.openStreams.keys()) {
      const stream = sub as unknown as { listenerCount?: (event: string) => number, on?: (event: string, fn: (err: Error) => void) => void }
      if (typeof stream.on === 'function' && stream.listenerCount?.('error') === 0) {
        stream.on('error', (err) => this.logger.debug({ err: this.loggable(err) }, 'fastify-request-db: a stream was stopped'))
      }
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
      if (text.name !== undefined) {
        const pooled = this.gate.pooler
        if (pooled !== null) {
          const unnamed = pooled.unnamed(text)
          if (unnamed instanceof Error) {
            reject(unnamed)
            return
          }
          text = unnamed
        } else {
          this.namedStatements = true
        }
      }
      // pg takes { name } alone to run a statement already prepared on the connection.
      sql = text.text ?? ''
    }
    if (this.guard !== null) {
      const refused = this.guard.refuse(sql)
      if (refused !== null) {
        reject(refused)
        return
      }
    }
    // Behind a transaction-mode pooler every statement is checked, not only a clean session's.
    if ((!this.dirty || this.gate.pooler !== null) && changesSessionState(sql)) {
      const pooled = this.gate.pooler
      if (pooled === null) {
        this.dirty = true
      } else {
        // What it lets through ends with the transaction: the connection to the pooler holds no
        // server state, so it stays reusable (not dirty).
        const sent = pooled.statement(sql, this.depth > 0 || this.transactionStatus(client) !== 'I')
        if (typeof sent !== 'string') {
          reject(sent)
          return
        }
        if (sent !== sql) text = typeof text === 'string' ? sent : { ...text, text: sent }
      }
    }
    const kind = transactionStatement(sql)
    if (kind !== null) this.runTransactionStatement(client, kind, text, values, resolve, reject)
    else if (this.depth > 0) this.run(client, text, values, (result) => this.stillInTransaction(client, result, resolve, reject), reject)
    else this.run(client, text, values, resolve, reject)
  }

  /**
   * Inside a transaction, a statement that is not a transaction statement must leave it open. One
   * that ended it ('…; COMMIT' in one text, a function that commits) took the route's or
   * transaction()'s work with it: what follows would run outside any transaction, so the
   * connection is given up and the request fails, never answering as if all of it were atomic.
   */
  private stillInTransaction (client: PoolClient, result: unknown, resolve: (result: any) => void, reject: (err: Error) => void): void {
    if (client.getTransactionStatus?.() !== 'I') {
      resolve(result)
      return
    }
    this.markBroken('a statement ended the transaction it ran in', 'failed')
    reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT('a statement ended the transaction it ran in (a COMMIT or ROLLBACK inside a multi-statement text?): what followed would not be part of it'))
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
      // AND CHAIN ends the transaction and opens the next one at once: the depth stays.
      after = depth === 0 || kind === 'end-with-options' ? depth : depth - 1
      if (depth > 0 && !ownsLevel) {
        reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT(`${kind === 'rollback' ? 'ROLLBACK' : 'COMMIT'} would end a transaction it did not begin (the route's, or transaction()'s): return to commit it, throw to roll it back`))
        return
      }
      if (depth > 1) {
        const name = savepointName(depth - 1)
        if (kind === 'commit') {
          sql = `RELEASE SAVEPOINT ${name}`
        } else if (kind === 'rollback') {
          // Two statements, one at a time: sent as one text, pg would answer with an array.
          this.run(client, `ROLLBACK TO SAVEPOINT ${name}`, undefined, () => {
            this.run(client, `RELEASE SAVEPOINT ${name}`, undefined, (result) => {
              this.levelSet(after)
              resolve(result)
            }, reject)
          }, reject)
          return
        } else {
          reject(new FST_REQUEST_DB_TRANSACTION_STATEMENT('AND CHAIN inside a nested transaction'))
          return
        }
      }
    }
    const sentAsIs = sql === null
    this.run(client, sentAsIs ? text : sql as string, sentAsIs ? values : undefined, (result) => {
      this.levelSet(after)
      resolve(result)
    }, (err) => {
      // A failed COMMIT or ROLLBACK of a real transaction ends it all the same (the server rolls back).
      if (sentAsIs && after < depth) this.levelSet(after)
      reject(err)
    })
  }

  /** A transaction statement moved the books to `depth` (one level up, or down to it). */
  private levelSet (depth: number): void {
    if (depth > this.depth) (this.plainLevels ??= []).push(depth)
    this.txDepth = depth
  }

  /** Send a statement as it is, counted in flight until pg answers. */
  private run (client: PoolClient, text: string | QueryConfig, values: unknown[] | undefined, resolve: (result: any) => void, reject: (err: Error) => void): void {
    this.pending++
    // Read again where it ends rather than captured: set before a session's first statement and
    // never unset, and the callback's closure stays as small as it was.
    if (this.activity !== null) this.activity.statementStarted(text)
    const message = queryChannel.hasSubscribers ? this.queryStarted(typeof text === 'string' ? text : text.text, false) : null
    // pg's callback form: its promise form adds two promises and a closure per statement, which
    // the benchmark's allocation count showed on every request.
    try {
      client.query(text as string, values as unknown[], (err: Error | null, result: QueryResult) => {
        if (this.activity !== null) this.activity.statementEnded()
        this.statementEnded()
        if (message !== null) queryEnded(message, err, result)
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

  private queryStarted (text: string, streaming: boolean): QueryMessage {
    const message: QueryMessage = { pool: this.gate.pool, request: this.request, text, streaming, startTime: now() }
    queryChannel.start.publish(message)
    queryChannel.end.publish(message)
    return message
  }

  protected statementError (err: Error): Error {
    if (this.shutdownCancel) return new FST_REQUEST_DB_CLOSING({ cause: err })
    if (isConnectionError(err)) {
      // The statement may have run before the connection broke: it is never sent again.
      this.markBroken(`it failed while a statement ran (${this.gate.redact(err.message)})`, 'failed')
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
    this.releaseClient(client, destroy, poolRelease, destroy ? this.destroyReason(closeConnection) : null)
    return undefined
  }

  /** Why the connection is closed rather than reused (for the release channel's metrics). */
  private destroyReason (closeConnection: boolean): DestroyReason {
    if (this.broken) return this.brokenKind
    if (closeConnection || this.rawHandedOut) return 'raw-client'
    if (this.dirty) return 'session-changed'
    return 'still-running'
  }

  private async rollBackThenRelease (client: PoolClient, poolRelease?: PoolClient['release']): Promise<void> {
    let destroy = false
    try {
      await client.query('ROLLBACK')
    } catch {
      destroy = true
    }
    this.releaseClient(client, destroy, poolRelease, destroy ? 'rollback-failed' : null)
  }

  private releaseClient (client: PoolClient, destroy: boolean, poolRelease: PoolClient['release'] | undefined, reason: DestroyReason | null): void {
    if (this.activity !== null) this.activity.released()
    try {
      this.gate.release(this, client, destroy, poolRelease, reason)
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

/** Publish a statement's end on the query channel. */
function queryEnded (message: QueryMessage, err: Error | null | undefined, result: QueryResult | undefined): void {
  message.durationMs = now() - (message.startTime as number)
  if (result !== undefined && result !== null) {
    message.command = result.command
    message.rowCount = result.rowCount
  }
  publishEnd(queryChannel, message, err)
}
