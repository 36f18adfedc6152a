import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import type { PoolClient } from 'pg'
import { releaseChannel } from './observability/channels.js'
import { startupScope, timeoutIn } from './async-context.js'
import { now } from './clock.js'

/** Something that holds a pool client for a while: a request's lease or an `app.db` call. */
export interface ClientHolder {
  readonly countsAsLease: boolean
  /** The request it is held for; null for `app.db` work. */
  readonly request: FastifyRequest | null
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
  /** When the holder took it (performance.now()); only kept while the release channel is watched. */
  since = 0
}

/**
 * How often held clients are checked for requests whose client went away. One timer for all, not
 * a listener per response: see Lease.checkStillWanted. A hang-up is noticed within this time.
 */
const SWEEP_MS = 100

/**
 * Who holds which pool connection right now: counted (for stats and shutdown's wait), listened to
 * (a held client's error reaches its holder), and swept (a holder whose request went away is told).
 */
export class HeldClients {
  /** Clients held right now (by requests and `app.db` alike). */
  count = 0
  /** Of those, the ones held by requests. */
  leased = 0
  // One record per connection, made at its first checkout; a request only writes its holder field.
  // A Set of holders (add and delete on every request) made V8 promote each request's objects to
  // the old generation, several times the garbage-collection work of a raw pool.
  private readonly records = new WeakMap<PoolClient, ClientRecord>()
  private readonly connections = new Set<ClientRecord>()
  private readonly log: FastifyBaseLogger
  private sweepTimer: NodeJS.Timeout | null = null
  // The sweep serves the whole pool: it runs in the context of the registration, not in that of
  // the request whose checkout happened to arm it (each holder enters its own: Lease.scope).
  private readonly scope = startupScope('sweep')
  private drained: (() => void) | null = null

  constructor (log: FastifyBaseLogger) {
    this.log = log
  }

  hold (holder: ClientHolder, client: PoolClient): void {
    let record = this.records.get(client)
    if (record === undefined) record = this.watch(client)
    record.holder = holder
    if (releaseChannel.hasSubscribers) record.since = now()
    this.count++
    if (holder.countsAsLease) this.leased++
    this.armSweep()
  }

  /**
   * `holder` gives `client` back. Counted once however often; a null holder never held it.
   * Returns how long it was held in ms, where that was recorded (see ClientRecord.since), else 0.
   */
  letGo (holder: ClientHolder | null, client: PoolClient): number {
    const record = this.records.get(client)
    let heldMs = 0
    if (holder !== null && record !== undefined && record.holder === holder) {
      if (record.since !== 0) {
        heldMs = now() - record.since
        record.since = 0
      }
      record.holder = null
      this.count--
      if (holder.countsAsLease) this.leased--
      if (record.ended) this.connections.delete(record)
    }
    // Resolves a promise: its waiter runs after the caller has handed the client to the pool.
    if (this.drained !== null && this.count === 0) this.drained()
    return heldMs
  }

  /** Resolves once every held client is back, or after `ms`. Returns how many were still held. */
  async allBack (ms: number): Promise<number> {
    if (this.count > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, ms)
        this.drained = () => {
          clearTimeout(timer)
          resolve()
        }
      })
      this.drained = null
    }
    return this.count
  }

  /** Cancel and give back whatever is still held. */
  forceReleaseAll (): void {
    for (const record of [...this.connections]) record.holder?.forceRelease()
  }

  private armSweep (): void {
    // One timer, re-armed from the sweep while anything is held, not per checkout. Checked here,
    // not by the callers: a sweep that frees a client makes pg-pool hand it to a waiter at once,
    // which comes back through hold() before the sweep re-arms.
    if (this.sweepTimer !== null) return
    this.sweepTimer = timeoutIn(this.scope, SWEEP_MS, () => this.sweep())
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
    if (this.count > 0) this.armSweep()
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
}
