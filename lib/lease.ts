import { AsyncResource } from 'node:async_hooks'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import { pipeline, type Readable, Transform } from 'node:stream'
import type { PoolClient, QueryConfig, QueryResult } from 'pg'
import { promised, type Taken } from './checkout.js'
import { isStaleStatement } from './context-statement.js'
import { FST_REQUEST_DB_CLOSING, FST_REQUEST_DB_COMMIT_FAILED, FST_REQUEST_DB_CONTEXT_STATEMENT, FST_REQUEST_DB_RELEASED } from './errors.js'
import { LeaseActivity } from './observability/lease-activity.js'
import type { ClientGate } from './pool.js'
import { type AppliedContext, callContext, checkContext, contextFailed, contextFunctionFor, type DbContextFunction, isThenable, Refusal, refusedByDatabase } from './request-context.js'
import type { ReplicaReads } from './replicas.js'
import { connectionGone, isStream, responseEnded } from './response-state.js'
import { CANCEL_GRACE_MS, type DbSession, notCommitted, OWN, Session } from './session.js'

/**
 * What `request.db.connect()` resolves to: the request's connection in the shape of a pg-pool
 * client, for libraries that take a pool (Kysely's `PostgresDialect({ pool: request.db })`).
 * Its statements are the request's own; `release()` does nothing, since the request gives the
 * connection back when it ends.
 */
export interface RequestDbClient extends Pick<DbSession, 'query'> {
  release (err?: unknown): void
}

/** `request.db`: the request's own connection, taken from the pool at first use. */
export interface RequestDb extends DbSession {
  /**
   * The request's `pg.PoolClient`, for LISTEN or anything this plugin can't see. Calling
   * `release()` on it is safe. Because its statements cannot be seen, the connection is closed
   * rather than reused afterwards. (Streams need no raw client: `request.db.query(stream)`.)
   */
  client (): Promise<PoolClient>
  /** The pg-pool face: resolves to the request's connection; every call to the same one. */
  connect (): Promise<RequestDbClient>
  /** The pg-pool face: does nothing (the connection goes back when the request ends). */
  end (): Promise<void>
  /**
   * Reads for a replica (`replicaUrls`): `request.db.replica.query(…)` runs on a usable replica,
   * on a second lease of its own, given back with the first. On the primary instead once this
   * request has used the primary (read-your-writes), on a transaction route, when no replica is
   * usable, or when there are none.
   */
  readonly replica: ReplicaReads
}

/** Per-route settings: `{ config: { db: { transaction: true } } }`. */
export interface RouteDbConfig {
  /** Run the whole request in one transaction: committed before the response if it succeeded. */
  transaction?: boolean
  /**
   * This route's database context function instead of the app's (`context` option), or `false`
   * for none. A request with a context runs in a transaction, as `transaction: true` does.
   */
  context?: DbContextFunction | false
  /** Run the request's statements on a read replica (`replicaUrls`), or the primary when none is usable. */
  readOnly?: boolean
}

const IDLE = 0
const ACQUIRING = 1
const ACTIVE = 2
const ENDED = 3

/**
 * A request's lease on one pool client. Nothing is taken from the pool until the first query, and
 * the client is given back exactly once, on whichever comes first of: the response finishing, the
 * connection closing under it (abort, connectionTimeout), or shutdown. Release waits for statements
 * in flight; on abort it gives them `abortGraceMs`, then cancels them on the server.
 */
export class Lease extends Session implements RequestDb {
  override get countsAsLease (): boolean {
    return true
  }

  /** The route's transaction (config.db.transaction) is open and awaits COMMIT in onSend. */
  routeTxOpen = false
  /** The handler (or a hook) threw: a route transaction is rolled back, never committed. */
  failed = false
  /** The route's COMMIT/ROLLBACK has started (onSend). */
  private settling = false
  /** handlerTimeout fired during COMMIT: the reply was hijacked, onSend must answer itself. */
  tookOverReply = false
  private state = IDLE
  /** Callers waiting for the client being taken (concurrent first queries share it). */
  private waiters: Taken[] | null = null
  /** onSend has run: a client taken from now on is released when the response closes. */
  private responding = false
  /** The response's 'close' listener is on: only for a client still in use after onSend. */
  private listening = false
  // Declared, not redefined: Session's field is assigned in the constructor (see countsAsLease).
  declare readonly request: FastifyRequest
  private readonly reply: FastifyReply
  private poolRelease: PoolClient['release'] | undefined = undefined
  /** The request is over and its release waits for statements before it would cancel them. */
  private awaitingStatements = false
  private poolFace: Promise<RequestDbClient> | null = null
  /** The route, read when a client is taken (routeOptions is built afresh on each read). */
  private route: FastifyRequest['routeOptions'] | null = null
  /** The request's database context: undefined until looked at, null for none. */
  private context: AppliedContext | null | undefined = undefined
  /**
   * The request's async context (OpenTelemetry's active span, an AsyncLocalStorage store), taken
   * when the request first takes a client. Work for this request that starts from the sweep, the
   * response's 'close', a connection's error, shutdown or a stream's end runs in it (`enter`), so
   * its statements, cancels and log lines belong to this request's trace (async-context.ts).
   */
  private scope: AsyncResource | null = null

  constructor (gate: ClientGate, request: FastifyRequest, reply: FastifyReply) {
    super(gate)
    ;(this as { request: FastifyRequest }).request = request
    this.reply = reply
  }

  async client (): Promise<PoolClient> {
    if (this.broken) throw this.brokenError()
    if (this.hasContextFunction()) {
      throw new FST_REQUEST_DB_CONTEXT_STATEMENT("request.db.client() hands out a connection whose statements can't be checked; use request.db.query, or config.db.context: false on the route")
    }
    const client = (this.opening ? null : this.current) ?? await promised((taken) => this.withClient(taken))
    if (this.poolRelease === undefined) {
      this.rawHandedOut = true
      this.poolRelease = client.release
      // User code may release the client it was handed: that gives it back (once) through us.
      client.release = () => this.releasedByUser(client)
    }
    return client
  }

  connect (): Promise<RequestDbClient> {
    // One object per request: Kysely keys its connection wrapper by the client it gets.
    return this.poolFace ??= Promise.resolve({
      query: ((text: never, values?: never) => this.query(text, values)) as RequestDbClient['query'],
      release () {}
    })
  }

  end (): Promise<void> {
    return Promise.resolve()
  }

  /**
   * The route's transaction opens when the request takes its client. Read before that, the depth
   * is 0 (as it is while that BEGIN is on the wire) and `transaction(fn)` would send a BEGIN
   * (ignored by the server) and a COMMIT of its own, committing the route's transaction half-way
   * and running what follows outside any transaction. So the client is taken (and the BEGIN
   * answered) first, and `fn` nests inside the route's transaction as a savepoint.
   */
  override transaction<T> (fn: (tx: this) => Promise<T> | T): Promise<T> {
    if (this.current !== null && !this.opening) return super.transaction(fn)
    return promised((taken) => this.withClient(taken)).then(() => super.transaction(fn))
  }

  get replica (): ReplicaReads {
    const replicas = this.gate.replicas
    return replicas === null ? this : replicas.readsFor(this)
  }

  /** The request has taken a client (run a statement) on this lease's pool. */
  get hasTakenClient (): boolean {
    return this.state !== IDLE
  }

  /** A lease for the same request on another gate (a replica's). */
  sibling (gate: ClientGate): Lease {
    return new Lease(gate, this.request, this.reply)
  }

  /** Is this a route transaction's route (`config.db.transaction`)? Read only where it's needed. */
  isTransactionRoute (): boolean {
    const db = (this.request.routeOptions.config as { db?: RouteDbConfig }).db
    return db?.transaction === true || contextFunctionFor(this.gate.context, db) !== null
  }

  /** Does a database context function apply to this request (whatever it will return)? */
  private hasContextFunction (): boolean {
    if (this.context !== undefined) return this.context !== null
    return contextFunctionFor(this.gate.context, (this.request.routeOptions.config as { db?: RouteDbConfig }).db) !== null
  }

  /**
   * onSend of a transaction route whose payload is a stream: the body may still read from this
   * connection (a cursor), so COMMIT can't come before it (pg would queue it behind the cursor,
   * which waits for the body, which waits for onSend: a deadlock). The payload is passed through a
   * stream that sends COMMIT (or ROLLBACK) when the body has been read to its end and ends only
   * after it: a failed COMMIT errors the response before its last bytes, so the client sees an
   * aborted response, never a complete 200. An error or a client gone half-way rolls back.
   */
  settleAtStreamEnd (payload: Readable, statusCode: number): Readable {
    const settle = (then: (err: Error | null) => void): void => {
      if (!this.routeTxOpen) {
        then(null)
        return
      }
      this.settle(statusCode, (err) => {
        this.settling = false
        then(err)
      })
    }
    const lease = this
    const body = new Transform({
      readableObjectMode: payload.readableObjectMode,
      writableObjectMode: payload.readableObjectMode,
      transform (chunk, _encoding, done) {
        done(null, chunk)
      },
      flush (done) {
        // Called from the source's end, in the context of whoever opened its connection.
        lease.enter(settle, done)
      }
    })
    // Destroying either destroys the other: the response closing early stops the source (a
    // QueryStream closes its cursor), and a source error errors the response.
    pipeline(payload, body, () => {})
    this.releaseEarly(body)
    return body
  }

  /**
   * onSend: the handler is done and the payload is ready, so the client goes back to the pool
   * without waiting for the bytes to be written, and serves the next request sooner. A streamed
   * payload may still read from the client (a cursor), or take one first, as may user code that
   * took the raw client, and a query the handler did not wait for may still be taking one: those
   * keep it until the response closes.
   */
  releaseEarly (payload: unknown): void {
    const state = this.state
    if (state === IDLE) this.responding = true
    // Fastify runs onSend for a request whose client already went away, maybe before the sweep
    // noticed: then a statement still running gets the abort's grace and cancel, not a wait.
    else if (state === ACTIVE && !this.rawHandedOut && !isStream(payload)) this.terminate(connectionGone(this.request, this.reply))
    else if (state !== ENDED) this.watchResponse()
  }

  /** The request's own logger: its lines carry the request id. */
  protected override get logger (): FastifyBaseLogger {
    return this.request.log
  }

  /**
   * The gate's sweep, while this request holds a client: whoever asked may be gone. A client that
   * hung up (or a connectionTimeout) mid-handler, or a hijacked reply that answered by itself,
   * ends the lease here, as the response's 'close' event would. The sweep replaces a 'close'
   * listener on every response, which cost ≈ 1 µs of CPU per request and 4 % of p99 under load
   * (real PostgreSQL, 100 connections, ten interleaved repetitions).
   */
  override checkStillWanted (): void {
    if (this.activity !== null) this.activity.sweep()
    if (this.state === ACTIVE && responseEnded(this.request, this.reply)) this.enter(this.terminate, !this.reply.raw.writableEnded)
  }

  /**
   * onSend of a transaction route: COMMIT (or ROLLBACK) before anything reaches the client, then
   * release as `releaseEarly` does. A failed COMMIT keeps the client for the error response's own
   * onSend. Callbacks, not async/await: this runs on every transaction route, and each await is a
   * promise.
   */
  settleThenRelease (statusCode: number, payload: unknown, then: (err: Error | null) => void): void {
    const client = this.current
    if (client !== null && this.openStreams !== null && this.openStreams.size > 0) {
      // A cursor the handler left open holds back anything sent after it, COMMIT included: nobody
      // will read it once the response is ready, so it is stopped first (else a hang).
      this.settling = true
      void this.stopStreams(client).then(() => this.settleThenRelease(statusCode, payload, then))
      return
    }
    this.settle(statusCode, (err) => {
      // From here onSend answers synchronously (no timer can fire before it writes).
      this.settling = false
      if (err === null) this.releaseEarly(payload)
      then(err)
    })
  }

  /** COMMIT the route's transaction if the request succeeded, else ROLLBACK. */
  private settle (statusCode: number, then: (err: Error | null) => void): void {
    this.routeTxOpen = false
    this.settling = true
    const client = this.current
    if (client === null) {
      then(null)
      return
    }
    this.transactionEnded()
    if (this.failed || statusCode >= 400) {
      // A broken connection takes its transaction with it: the server rolls back on disconnect.
      if (this.broken) {
        then(null)
        return
      }
      this.dispatch(client, OWN.ROLLBACK, undefined, () => then(null), (err) => {
        this.rollbackFailed(err, null)
        then(null)
      })
      return
    }
    this.dispatch(client, OWN.COMMIT, undefined, (result: QueryResult) => then(notCommitted(result)),
      (err) => then(new FST_REQUEST_DB_COMMIT_FAILED(this.gate.redact(err.message), { cause: err })))
  }

  override forceRelease (): void {
    this.enter(this.releaseForShutdown, undefined)
  }

  private releaseForShutdown (): void {
    this.markBroken('the server is shutting down', 'shutdown')
    this.shutdownCancel = true
    if (this.state !== ENDED) this.terminate(true)
    // A release waiting for statements to end on their own (finish) cancels them now instead; one
    // that already cancelled them keeps waiting for that.
    else if (this.awaitingStatements) this.stopWaiting()
  }

  override connectionFailed (err: Error): void {
    // Emitted by the connection's socket, in the context of whichever request opened it.
    this.enter(this.heldConnectionFailed, err)
  }

  private heldConnectionFailed (err: Error): void {
    const client = this.current
    // Nothing in flight, and nothing this request set lives on the connection (wouldLose): drop the
    // dead connection, and the next statement quietly takes a new one, which serves it exactly as
    // the old would have. Anything else and every later use fails with CONNECTION_LOST: a new
    // connection would run without the request's transaction, role, search_path, locks, temp tables.
    if (client !== null && this.state === ACTIVE && !this.broken && !this.isBusy() && this.wouldLose() === null) {
      this.current = null
      this.state = IDLE
      this.gate.release(this, client, true, undefined, 'failed')
      this.logger.warn({ err: this.loggable(err) },
        'fastify-request-db: a held database connection failed between statements; the next one takes a new connection')
      return
    }
    super.connectionFailed(err)
  }

  protected override queryWithoutClient (text: string | QueryConfig, values?: unknown[]): Promise<any> {
    // The first query of a request: one promise from checkout to result, as pool.query has.
    return new Promise((resolve, reject) => {
      this.withClient((err, client) => {
        if (err === null) this.dispatch(client as PoolClient, text, values, resolve, reject)
        else reject(err)
      })
    })
  }

  /** Call `then` with the request's client, taking one from the pool at first use. */
  protected override withClient (then: Taken): void {
    if (this.waiters !== null) {
      this.waiters.push(then)
      return
    }
    const client = this.current
    if (client !== null) {
      then(null, client)
      return
    }
    // The context could not be applied: never go on without it.
    const guard = this.guard
    if (guard !== null && guard.failure !== null) {
      then(guard.failure)
      return
    }
    if (this.state === ENDED || responseEnded(this.request, this.reply)) {
      // Opens no connection: after the response, background work belongs on app.db. A request
      // still running whose client the shutdown took back gets the shutdown's 503 instead.
      this.state = ENDED
      then(this.shutdownCancel ? new FST_REQUEST_DB_CLOSING() : new FST_REQUEST_DB_RELEASED())
      return
    }
    this.state = ACQUIRING
    this.waiters = [then]
    // Only requests that take a client pay for it: ≈ 0.15 µs with no AsyncLocalStorage in use.
    const scope = this.scope ??= new AsyncResource('fastify-request-db.request')
    if (this.responding) this.watchResponse()
    if (this.gate.watchesLeases) (this.activity ??= new LeaseActivity(this.request, this.gate.leaks)).waitStarted()
    const route = this.route = this.request.routeOptions
    if (this.context === undefined) {
      const fn = contextFunctionFor(this.gate.context, (route.config as { db?: RouteDbConfig }).db)
      if (fn !== null) {
        // Before a client is taken: a context function that throws or waits holds no connection.
        this.resolveContext(fn, scope)
        return
      }
      this.context = null
    }
    this.takeClient(scope)
  }

  private takeClient (scope: AsyncResource): void {
    // The answer may come from elsewhere: a client another request gives back is handed over inside
    // that request's release, and the wait's deadline is the pool's timer. Its BEGIN and first
    // statement are this request's.
    this.gate.take(this, (err, taken) => scope.runInAsyncScope(this.taken, this, err, taken))
  }

  /** A synchronous context function goes on at once: no promise, no tick. */
  private resolveContext (fn: unknown, scope: AsyncResource): void {
    let result: unknown
    try {
      result = callContext(fn, this.request, this.gate.redact)
    } catch (err) {
      this.contextRejected(err as Error)
      return
    }
    if (isThenable(result)) {
      result.then((value) => this.checkThenTake(value, scope), (err: unknown) => this.contextRejected(contextFailed(err, this.gate.redact)))
      return
    }
    this.checkThenTake(result, scope)
  }

  private checkThenTake (value: unknown, scope: AsyncResource): void {
    let context: AppliedContext | null
    try {
      context = checkContext(value, this.gate.contextRoles)
    } catch (err) {
      this.contextRejected(err as Error)
      return
    }
    this.contextResolved(context, scope)
  }

  private contextResolved (context: AppliedContext | null, scope: AsyncResource): void {
    this.context = context
    // Set before any statement can be sent: they all wait for the client.
    if (context !== null) this.guard = context
    if (this.state === ACQUIRING) this.takeClient(scope)
    else this.answerWaiters(new FST_REQUEST_DB_RELEASED())
  }

  private contextRejected (err: Error): void {
    // Every later use fails the same way: the request never runs without its context.
    this.guard = new Refusal(err)
    if (this.state === ACQUIRING) this.state = IDLE
    this.answerWaiters(err)
  }

  private taken (err: Error | null, client: PoolClient | undefined): void {
    if (this.activity !== null) this.activity.waitEnded(err === null)
    if (err !== null) {
      if (this.state === ACQUIRING) this.state = IDLE
      this.answerWaiters(err)
      return
    }
    if (this.state !== ACQUIRING || connectionGone(this.request, this.reply)) {
      // The request ended while it waited for a client, or its client went away meanwhile. (A
      // response merely sent is not a reason: a query started before it runs, and the response's
      // 'close' or the sweep gives the client back afterwards.)
      this.state = ENDED
      this.gate.release(this, client as PoolClient, false)
      this.answerWaiters(new FST_REQUEST_DB_RELEASED())
      return
    }
    this.current = client as PoolClient
    this.state = ACTIVE
    const route = this.route as FastifyRequest['routeOptions']
    if (route.handlerTimeout > 0) {
      // handlerTimeout answers 503 but leaves the handler running: stop its statement on the server.
      const signal = this.request.signal
      signal.addEventListener('abort', () => {
        // Fastify also aborts this signal when the request stream closes, which for a request with a
        // body is as soon as the body was read: only its timeout error means "the handler ran out
        // of time". (A client that went away is the sweep's business: checkStillWanted.)
        if ((signal.reason as { code?: string } | undefined)?.code === 'FST_ERR_HANDLER_TIMEOUT') this.enter(this.handlerTimedOut, undefined)
      }, { once: true })
    }
    const context = this.context ?? null
    if (context !== null || (route.config as { db?: RouteDbConfig }).db?.transaction === true) this.begin(client as PoolClient, context, false)
    else this.answerWaiters(null, client)
  }

  /**
   * The route's transaction: BEGIN, and the request's database context in the same round trip.
   * `again`: the connection's memory of its prepared statements was wrong, and this is the second
   * try. Until it is answered, the request's statements wait (`opening`).
   */
  private begin (client: PoolClient, context: AppliedContext | null, again: boolean): void {
    this.opening = true
    this.dispatch(client, context === null ? OWN.BEGIN : context.begin(this.gate.pooler === null), undefined, () => {
      if (this.gaveBack(client)) return
      this.txDepth = 1
      this.routeTxOpen = true
      this.answerWaiters(null, client)
    }, (beginError) => {
      if (this.gaveBack(client)) return
      if (context === null || this.broken) {
        this.answerWaiters(beginError)
        return
      }
      if (!again && isStaleStatement(beginError)) {
        // Its statement was dropped from outside a request (DEALLOCATE ALL, DISCARD ALL): roll back
        // the batch's aborted transaction, then send it again (context-statement.ts).
        this.dispatch(client, OWN.ROLLBACK, undefined, () => {
          if (!this.gaveBack(client)) this.begin(client, context, true)
        }, (err) => {
          if (this.gaveBack(client)) return
          if (this.broken) this.answerWaiters(err)
          else this.contextRefused(err)
        })
        return
      }
      this.contextRefused(beginError)
    })
  }

  /**
   * The request ended while its BEGIN was on the wire, and the lease gave `client` back once that
   * was answered (or is about to): nothing more is sent on it for this request. A retry there would
   * open a transaction in this request's context on a connection that is someone else's now.
   */
  private gaveBack (client: PoolClient): boolean {
    if (this.current === client) return false
    this.answerWaiters(this.shutdownCancel ? new FST_REQUEST_DB_CLOSING() : new FST_REQUEST_DB_RELEASED())
    return true
  }

  /**
   * The server refused the context (a role that does not exist, say), or the transaction it was
   * to open can't be trusted: nothing else runs on this connection for the request.
   */
  private contextRefused (err: Error): void {
    const refused = refusedByDatabase(err, this.gate.redact)
    this.guard = new Refusal(refused)
    // pg reports the error before the server's ReadyForQuery: the transaction status it shows may
    // still be the idle one from before this BEGIN, and an aborted transaction would go back to
    // the pool as clean. The connection is closed instead (this is a misconfiguration, not a
    // hot path).
    this.dirty = true
    this.answerWaiters(refused)
  }

  private answerWaiters (err: Error | null, client?: PoolClient): void {
    const waiters = this.waiters as Taken[]
    this.waiters = null
    this.opening = false
    for (const then of waiters) then(err, client)
  }

  /**
   * 'close' is the one event every ending shares: after 'finish' for a sent response, alone when
   * the client went away.
   */
  private watchResponse (): void {
    if (this.listening) return
    this.listening = true
    const res = this.reply.raw
    res.on('close', () => this.enter(this.terminate, !res.writableEnded))
  }

  /** Run `fn` in the request's own async context: for work started from outside the request. */
  private enter<A> (fn: (this: this, arg: A) => void, arg: A): void {
    const scope = this.scope
    // No client taken yet: nothing this request owns runs on a connection.
    if (scope === null) fn.call(this, arg)
    else scope.runInAsyncScope(fn, this, arg)
  }

  private terminate (aborted: boolean): void {
    const state = this.state
    // Reached from onSend, the sweep, a stream's 'close' and shutdown: whichever comes first acts.
    this.state = ENDED
    if (state !== ACTIVE) return
    const client = this.current as PoolClient
    this.current = null
    this.routeTxOpen = false
    if (this.pending === 0 && !(aborted && this.rawHandedOut)) void this.giveBack(client, this.rawHandedOut, this.poolRelease)
    else void this.finish(client, aborted)
  }

  private async finish (client: PoolClient, aborted: boolean): Promise<void> {
    // A response that was sent normally lets its statements finish; an aborted one gives them a
    // moment to end on their own, then cancels them: most statements end within moments, and a
    // cancel costs the connection (see Session.cancel), so under an abort storm (a proxy's timeout,
    // a load generator's stop) cancelling at once replaced every busy connection and the new ones'
    // handshakes hit the requests that followed. Shutdown cancels at once, and so does an abort
    // while user code holds the raw client (what runs on it can be neither seen nor waited for).
    // A statement that ignores the cancel loses its connection.
    // A stream still open when the response is over (its reader gone, or never read to the end)
    // will never finish on its own: it gets the same grace, then is stopped (stopStreams).
    const streaming = this.openStreams !== null && this.openStreams.size > 0
    if (!this.shutdownCancel && !(aborted && this.rawHandedOut)) {
      this.awaitingStatements = true
      await this.whenSettled(aborted || streaming ? this.gate.abortGraceMs : Number.POSITIVE_INFINITY)
      this.awaitingStatements = false
    }
    if (this.openStreams !== null && this.openStreams.size > 0) await this.stopStreams(client)
    if ((aborted || this.shutdownCancel) && this.isBusy()) {
      this.cancel(client, this.shutdownCancel ? 'the server is shutting down' : 'the client went away')
      await this.whenSettled(CANCEL_GRACE_MS)
    }
    await this.giveBack(client, this.rawHandedOut, this.poolRelease)
  }

  private handlerTimedOut (): void {
    if (this.settling) {
      // The handler finished and its COMMIT is on the wire, but Fastify's timer only stops when the
      // response is written: its 503 would tell the client "failed" about a write that commits.
      // Taking the reply over stops that 503; onSend then answers with what COMMIT really did.
      // (Found by the soak run: a write answered 503 yet present in the database.)
      this.reply.hijack()
      this.tookOverReply = true
      return
    }
    this.cancelRunning()
  }

  private cancelRunning (): void {
    const client = this.current
    if (client !== null && this.isBusy()) this.cancel(client, 'handlerTimeout')
  }

  private releasedByUser (client: PoolClient): void {
    if (this.current !== client) return
    this.current = null
    this.routeTxOpen = false
    if (this.state === ACTIVE) this.state = IDLE
    const poolRelease = this.poolRelease
    this.poolRelease = undefined
    this.rawHandedOut = false
    // Its statements were not ours to see, so its session state is unknown: close it.
    void this.giveBack(client, true, poolRelease)
  }
}
