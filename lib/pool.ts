import type { FastifyBaseLogger } from 'fastify'
import type { PoolClient } from 'pg'
import {
  FST_REQUEST_DB_ACQUIRE_TIMEOUT,
  FST_REQUEST_DB_CLOSING,
  FST_REQUEST_DB_OVERLOADED,
  FST_REQUEST_DB_UNAVAILABLE
} from './errors.js'
import { promised, type Taken } from './checkout.js'
import { now } from './clock.js'
import { type ClientHolder, HeldClients } from './held-clients.js'
import { type AcquireMessage, acquireChannel, type DestroyReason, publishEnd, releaseChannel, type ReleaseMessage } from './observability/channels.js'
import { LeakDetector } from './observability/leak-detector.js'
import type { ResolvedOptions } from './options.js'
import type { PostgresPool } from './postgres-pool.js'
import type { DbContextFunction } from './request-context.js'
import { TransactionPooler } from './pooler.js'
import type { Replicas } from './replicas.js'
import { WaitQueue } from './wait-queue.js'

/** Pool figures: `leased` is the clients held by requests right now. */
export interface DbStats {
  total: number
  idle: number
  waiting: number
  leased: number
  /** Requests reported for holding their connection longer than `leakDetectionMs`, since start. */
  leaksDetected: number
}

const TIMED_OUT = new Error('acquire timed out')

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
  /** Leak detection (options.leakDetectionMs), or null when it is off. */
  readonly leaks: LeakDetector | null
  /** Requests keep books on their statements (leak detection or request timing is on). */
  readonly watchesLeases: boolean
  /** The app's database context function (options.context), or null. */
  readonly context: DbContextFunction | null
  /** The roles a context may set (options.contextRoles). */
  readonly contextRoles: ReadonlySet<string>
  closing = false
  /** The rules of a transaction-mode pooler (options.pooler), or null when there is none. */
  readonly pooler: TransactionPooler | null
  /** The app's read replicas (options.replicaUrls), on the primary's gate; null when there are none. */
  replicas: Replicas | null = null
  private readonly held: HeldClients
  /** The longest wait for a client (options.acquireTimeoutMs); also the health check's default deadline. */
  readonly acquireTimeoutMs: number
  private readonly maxWaiting: number
  private readonly max: number
  private readonly queue: WaitQueue

  constructor (pool: PostgresPool, options: ResolvedOptions, log: FastifyBaseLogger, redact: (text: string) => string) {
    this.pool = pool
    this.log = log
    this.redact = redact
    this.acquireTimeoutMs = options.acquireTimeoutMs
    this.abortGraceMs = options.abortGraceMs
    this.maxWaiting = options.maxWaiting
    this.max = pool.options?.max ?? options.max
    this.queue = new WaitQueue(options.acquireTimeoutMs, (waiter) => waiter.taken(this.acquireError(TIMED_OUT)))
    this.held = new HeldClients(log)
    this.leaks = options.leakDetectionMs > 0 ? new LeakDetector(options.leakDetectionMs, redact) : null
    this.watchesLeases = this.leaks !== null || options.logDbTime || options.serverTiming
    this.context = options.context
    this.contextRoles = options.contextRoles
    this.pooler = options.pooler === 'transaction' ? new TransactionPooler() : null
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
    if (acquireChannel.hasSubscribers) taken = this.published(holder, taken)
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

  /**
   * Give a client back to the pool; `destroy` closes its connection instead of reusing it, for
   * `reason` (published on the release channel, for metrics).
   */
  release (holder: ClientHolder | null, client: PoolClient, destroy: boolean, poolRelease = client.release, reason: DestroyReason | null = null): void {
    const heldMs = this.held.letGo(holder, client)
    poolRelease.call(client, destroy ? new Error('fastify-request-db: connection not reusable') : undefined)
    if (holder !== null && releaseChannel.hasSubscribers) {
      const message: ReleaseMessage = { pool: this.pool, request: holder.request, destroyed: destroy, reason: destroy ? reason ?? 'still-running' : null, heldMs }
      releaseChannel.publish(message)
    }
  }

  /** `taken`, with the checkout published on the acquire channel around it. */
  private published (holder: ClientHolder, taken: Taken): Taken {
    const message: AcquireMessage = { pool: this.pool, request: holder.request }
    const started = now()
    acquireChannel.start.publish(message)
    acquireChannel.end.publish(message)
    return (err, client) => {
      message.waitMs = now() - started
      publishEnd(acquireChannel, message, err)
      taken(err, client)
    }
  }

  stats (): DbStats {
    const pool = this.pool
    return {
      total: pool.totalCount,
      idle: pool.idleCount,
      waiting: pool.waitingCount,
      leased: this.held.leased,
      leaksDetected: this.leaks?.detected ?? 0
    }
  }

  /** Resolves once every held client is back, or after `ms`. Returns how many were still held. */
  waitForHolders (ms: number): Promise<number> {
    return this.held.allBack(ms)
  }

  /** Cancel and give back whatever is still held. */
  forceReleaseAll (): void {
    this.held.forceReleaseAll()
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
        this.held.hold(holder, client)
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
