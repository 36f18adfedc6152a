import type { FastifyBaseLogger } from 'fastify'
import type { PoolClient } from 'pg'
import {
  FST_REQUEST_DB_ACQUIRE_TIMEOUT,
  FST_REQUEST_DB_CLOSING,
  FST_REQUEST_DB_OVERLOADED,
  FST_REQUEST_DB_UNAVAILABLE
} from './errors.js'
import type { ResolvedOptions } from './options.js'
import { WaitQueue } from './wait-queue.js'

/**
 * The slice of `pg.Pool` this plugin uses. A real `pg.Pool` fits; so does a wrapper that injects
 * faults in a test, without patching pg itself.
 */
export interface PostgresPool {
  connect (): Promise<PoolClient>
  // The callback form is the one used per request: no promise per checkout. A pool whose connect()
  // ignores the callback and returns a promise still works.
  connect (callback: (err: Error | undefined, client: PoolClient | undefined, done: (release?: any) => void) => void): void
  end (): Promise<void>
  on (event: 'error', listener: (err: Error, client: PoolClient) => void): unknown
  readonly totalCount: number
  readonly idleCount: number
  readonly waitingCount: number
  readonly ending?: boolean
  readonly options?: { max?: number, connectionTimeoutMillis?: number }
}

/** Pool figures: `leased` is the clients held by requests right now. */
export interface DbStats {
  total: number
  idle: number
  waiting: number
  leased: number
}

/** Something that holds a pool client for a while: a request's lease or an `app.db` call. */
export interface ClientHolder {
  readonly countsAsLease: boolean
  /** The connection reported an error while held: it must not be reused. */
  connectionFailed (err: Error): void
  /** Shutdown's last resort: cancel what runs and give the client back now. */
  forceRelease (): void
  /** The sweep: give the client back if whoever it is held for has gone away. */
  checkStillWanted (): void
}

/**
 * Our books on one pool connection, kept for the connection's lifetime: who holds it right now.
 * Kept beside the client, not on it: properties added to pg's clients change their hidden class as
 * each connection is first used, which deoptimized pg's own hot functions in the benchmark.
 */
class ClientRecord {
  holder: ClientHolder | null = null
  /** The connection closed while held: the record goes when the holder gives it back. */
  ended = false
}

const TIMED_OUT = new Error('acquire timed out')

/**
 * How often held clients are checked for requests whose client went away. One timer for all, not
 * a listener per response: see Lease.checkStillWanted. A hang-up is noticed within this time.
 */
const SWEEP_MS = 100

/** How a checkout answers: an error (typed 503), or the client. */
export type Taken = (err: Error | null, client?: PoolClient) => void

/** A checkout in callback form as a promise, for the callers that want one. */
export function promised (start: (taken: Taken) => void): Promise<PoolClient> {
  return new Promise((resolve, reject) => {
    start((err, client) => {
      if (err === null) resolve(client as PoolClient)
      else reject(err)
    })
  })
}

/**
 * Hands out pool clients and takes them back, and keeps the books: how many are leased, who holds
 * them (for shutdown), and whether the app is closing. Every client a request or `app.db` uses
 * passes through here.
 */
export class ClientGate {
  readonly pool: PostgresPool
  readonly log: FastifyBaseLogger
  readonly redact: (text: string) => string
  /** An aborted request's statement runs this long before it is cancelled (options.abortGraceMs). */
  readonly abortGraceMs: number
  closing = false
  leased = 0
  /** Clients held right now (by requests and `app.db` alike). */
  private held = 0
  // One record per connection, made at its first checkout; a request only writes its holder field.
  // A Set of holders (add and delete on every request) made V8 promote each request's objects to
  // the old generation, several times the garbage-collection work of a raw pool.
  private readonly records = new WeakMap<PoolClient, ClientRecord>()
  private readonly connections = new Set<ClientRecord>()
  private readonly acquireTimeoutMs: number
  private readonly maxWaiting: number
  private readonly max: number
  private readonly queue: WaitQueue
  private sweepTimer: NodeJS.Timeout | null = null
  private drained: (() => void) | null = null

  constructor (pool: PostgresPool, options: ResolvedOptions, log: FastifyBaseLogger, redact: (text: string) => string) {
    this.pool = pool
    this.log = log
    this.redact = redact
    this.acquireTimeoutMs = options.acquireTimeoutMs
    this.abortGraceMs = options.abortGraceMs
    this.maxWaiting = options.maxWaiting
    this.max = pool.options?.max ?? options.max
    this.queue = new WaitQueue(options.acquireTimeoutMs, (waiter) => waiter.taken(this.acquireError(TIMED_OUT)))
  }

  /** Take a client for `holder`. Rejects with a typed 503 error: never waits past acquireTimeoutMs. */
  acquire (holder: ClientHolder): Promise<PoolClient> {
    return promised((taken) => this.take(holder, taken))
  }

  /**
   * `acquire` in callback form, for the per-request path: a promise and an await per checkout
   * showed up in the benchmark's profiles. `taken` may be called synchronously (closing, overloaded).
   */
  take (holder: ClientHolder, taken: Taken): void {
    if (this.closing) {
      taken(new FST_REQUEST_DB_CLOSING())
      return
    }
    const pool = this.pool
    // A free client is handed over at once: no timer, no queue accounting on the hot path.
    if (pool.idleCount > 0 && pool.waitingCount === 0) {
      this.connect(holder, taken, false)
      return
    }
    if (this.queue.size >= this.maxWaiting) {
      taken(new FST_REQUEST_DB_OVERLOADED(this.queue.size))
      return
    }
    this.connect(holder, taken, true)
  }

  /** Give a client back to the pool; `destroy` closes its connection instead of reusing it. */
  release (holder: ClientHolder | null, client: PoolClient, destroy: boolean, poolRelease = client.release): void {
    const record = this.records.get(client)
    // Counted once however often it is given back; `holder` is null for a client never handed out.
    if (holder !== null && record !== undefined && record.holder === holder) {
      record.holder = null
      this.held--
      if (holder.countsAsLease) this.leased--
      if (record.ended) this.connections.delete(record)
    }
    poolRelease.call(client, destroy ? new Error('fastify-request-db: connection not reusable') : undefined)
    if (this.drained !== null && this.held === 0) this.drained()
  }

  stats (): DbStats {
    const pool = this.pool
    return { total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount, leased: this.leased }
  }

  /** Resolves once every held client is back, or after `ms`. Returns how many were still held. */
  async waitForHolders (ms: number): Promise<number> {
    if (this.held > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, ms)
        this.drained = () => {
          clearTimeout(timer)
          resolve()
        }
      })
      this.drained = null
    }
    return this.held
  }

  /** Cancel and give back whatever is still held. */
  forceReleaseAll (): void {
    for (const record of [...this.connections]) record.holder?.forceRelease()
  }

  private track (holder: ClientHolder, client: PoolClient): void {
    let record = this.records.get(client)
    if (record === undefined) record = this.watch(client)
    record.holder = holder
    this.held++
    if (holder.countsAsLease) this.leased++
    this.armSweep()
  }

  private armSweep (): void {
    // One timer, re-armed from the sweep while anything is held, not per checkout. Checked here,
    // not by the callers: a sweep that frees a client makes pg-pool hand it to a waiter at once,
    // which comes back through track() before the sweep re-arms.
    if (this.sweepTimer !== null) return
    this.sweepTimer = setTimeout(() => this.sweep(), SWEEP_MS)
    this.sweepTimer.unref()
  }

  private sweep (): void {
    this.sweepTimer = null
    // A holder that ends here gives its client back, which may delete its record: a Set's
    // iteration allows that.
    for (const record of this.connections) {
      try {
        record.holder?.checkStillWanted()
      } catch (err) {
        // Thrown from a timer, it would take the process down; one holder must not stop the rest.
        this.log.error({ err }, 'fastify-request-db: checking a held client failed')
      }
    }
    if (this.held > 0) this.armSweep()
  }

  /** A connection's first checkout: start its record, and listen for its errors while held. */
  private watch (client: PoolClient): ClientRecord {
    const record = new ClientRecord()
    this.records.set(client, record)
    this.connections.add(record)
    // pg-pool listens for errors only on idle clients (node-postgres#2852): a checked-out client
    // whose backend dies emits 'error' with no listener, which would crash the process. Idle
    // clients are pg-pool's to report (its 'error' event on the pool); held ones are ours.
    client.on('error', (err: Error) => record.holder?.connectionFailed(err))
    client.once('end', () => {
      // A held connection that died stays listed until it is given back: shutdown must still
      // find its holder, or pg-pool's end() would wait forever for it.
      if (record.holder === null) this.connections.delete(record)
      else record.ended = true
    })
    return record
  }

  private connect (holder: ClientHolder, taken: Taken, waits: boolean): void {
    const waiter = waits ? this.queue.add(taken) : null
    const connected = (err: Error | null | undefined, client?: PoolClient): void => {
      if (waiter !== null) {
        if (waiter.answered) {
          // Too late for the request that asked (its deadline answered it): back to the pool. On
          // the next tick: pg-pool hands a freed client to the next waiter synchronously, and a run
          // of timed-out waiters would otherwise recurse once per waiter.
          if (client !== undefined && (err === null || err === undefined)) process.nextTick(() => client.release())
          return
        }
        this.queue.answered(waiter)
      }
      if ((err !== null && err !== undefined) || client === undefined) {
        taken(this.acquireError(err))
      } else if (this.closing) {
        // close() began while this request waited: it gets no client after all.
        this.release(null, client, false)
        taken(new FST_REQUEST_DB_CLOSING())
      } else {
        this.track(holder, client)
        taken(null, client)
      }
    }
    const promise = this.pool.connect(connected) as unknown
    if (isThenable(promise)) promise.then((client) => connected(null, client), connected)
  }

  private acquireError (err: unknown): Error {
    if (err === TIMED_OUT || (err instanceof Error && err.message.includes('timeout exceeded when trying to connect'))) {
      // A full pool means the wait was for a free client; otherwise a new connection took too long.
      return this.pool.totalCount >= this.max
        ? new FST_REQUEST_DB_ACQUIRE_TIMEOUT(this.acquireTimeoutMs)
        : new FST_REQUEST_DB_UNAVAILABLE(`no connection within ${this.acquireTimeoutMs}ms`)
    }
    if (this.pool.ending === true || (err instanceof Error && err.message.includes('after calling end on the pool'))) {
      return new FST_REQUEST_DB_CLOSING()
    }
    return unavailable(err, this.redact)
  }
}

function isThenable (value: unknown): value is PromiseLike<PoolClient> {
  return value !== null && typeof value === 'object' && typeof (value as { then?: unknown }).then === 'function'
}

/** Wrap a connection-level failure in the typed 503, message redacted, original kept as cause. */
export function unavailable (err: unknown, redact: (text: string) => string): Error {
  const message = err instanceof Error ? err.message : String(err)
  return new FST_REQUEST_DB_UNAVAILABLE(redact(message), { cause: err })
}

// SQLSTATE classes that mean the connection, not the statement, failed: 08 connection exception,
// 57P01-57P03 admin/crash shutdown and cannot-connect-now. Socket errors carry errno codes.
const CONNECTION_CODES = new Set(['57P01', '57P02', '57P03', 'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH'])

/** Did this error break the connection (as opposed to failing one statement)? */
export function isConnectionError (err: unknown): boolean {
  if (!(err instanceof Error)) return false
  const code = (err as { code?: unknown }).code
  if (typeof code === 'string') return code.startsWith('08') || CONNECTION_CODES.has(code)
  return /Connection terminated|not queryable/i.test(err.message)
}
