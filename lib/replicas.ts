import type { FastifyBaseLogger, FastifyInstance, FastifyRequest } from 'fastify'
import pg from 'pg'
import type { Taken } from './checkout.js'
import type { ClientHolder } from './held-clients.js'
import { leaseOf, setLease } from './hooks.js'
import type { Lease, RouteDbConfig } from './lease.js'
import type { ResolvedOptions } from './options.js'
import { ClientGate, type DbStats } from './pool.js'
import type { PostgresPool } from './postgres-pool.js'
import type { DbSession } from './session.js'
import { addShutdownHooks } from './shutdown.js'
import type { PoolClient } from 'pg'

/** `request.db.replica`: one read sent to a replica (or the primary: read-your-writes, fallback). */
export type ReplicaReads = Pick<DbSession, 'query'>

/** One replica as the background check last saw it: `app.db.replicas`. */
export interface ReplicaStatus {
  /** `host:port/database`, never the password. */
  name: string
  /** Reads go there: it answered the last check, is in recovery, and lags at most `maxReplicaLagMs`. */
  usable: boolean
  /** How far it was behind at the last check, in ms (0: it had replayed all the primary had written). */
  lagMs: number | null
  /** Why it is not usable; null when it is. */
  reason: string | null
  stats: DbStats
}

// The check is bounded: a replica that accepts but never answers is not usable.
const CHECK_TIMEOUT_MS = 2000

/**
 * A replica's gate: the same acquire timeout, typed errors, held-client books and shutdown as the
 * primary's. When the replica is not usable, or opening a connection to it fails, the client comes
 * from the primary instead (borrowed), so a replica that went away costs only the requests whose
 * statement was running on it. A borrowed client is given back to the primary's books.
 */
class ReplicaGate extends ClientGate {
  private readonly borrowed = new WeakSet<PoolClient>()

  constructor (pool: PostgresPool, options: ResolvedOptions, log: FastifyBaseLogger, redact: (text: string) => string,
    private readonly primary: ClientGate, readonly replica: Replica) {
    super(pool, options, log, redact)
  }

  override take (holder: ClientHolder, taken: Taken): void {
    if (!this.replica.usable) {
      this.borrow(holder, taken)
      return
    }
    super.take(holder, (err, client) => {
      if (err !== null && (err as { code?: string }).code === 'FST_REQUEST_DB_UNAVAILABLE') {
        this.replica.markUnusable(`a connection could not be opened (${err.message})`)
        this.borrow(holder, taken)
        return
      }
      taken(err, client)
    })
  }

  override release (holder: ClientHolder | null, client: PoolClient, destroy: boolean, poolRelease = client.release, reason: Parameters<ClientGate['release']>[4] = null): void {
    if (this.borrowed.delete(client)) {
      this.primary.release(holder, client, destroy, poolRelease, reason)
      return
    }
    // A connection that broke under a statement: the replica may be gone. Not used until the next
    // check finds it well, so the requests that follow go to the primary instead of failing too.
    if (destroy && reason === 'failed') this.replica.markUnusable('a connection to it failed')
    super.release(holder, client, destroy, poolRelease, reason)
  }

  private borrow (holder: ClientHolder, taken: Taken): void {
    this.primary.take(holder, (err, client) => {
      if (client !== undefined) this.borrowed.add(client)
      taken(err, client)
    })
  }
}

class Replica {
  usable = false
  lagMs: number | null = null
  reason: string | null = 'not checked yet'
  readonly gate: ReplicaGate

  constructor (readonly name: string, readonly pool: pg.Pool, options: ResolvedOptions, private readonly log: FastifyBaseLogger,
    redact: (text: string) => string, primary: ClientGate) {
    this.gate = new ReplicaGate(pool, options, log, redact, primary, this)
  }

  markUnusable (reason: string): void {
    if (this.usable) this.log.warn({ replica: this.name, reason }, 'fastify-request-db: a replica is not used until it is healthy again; its reads go to the primary')
    this.usable = false
    this.reason = reason
  }

  markUsable (lagMs: number): void {
    if (!this.usable && this.reason !== 'not checked yet') this.log.info({ replica: this.name, lagMs }, 'fastify-request-db: a replica is used again')
    this.usable = true
    this.lagMs = lagMs
    this.reason = null
  }
}

/**
 * The app's read replicas (`replicaUrls`): a pool and a gate each, and a background check of each
 * one's lag. A route with `config.db.readOnly` gets a lease on a usable replica as its `request.db`;
 * `request.db.replica` lends any route a second lease, on a replica, for reads — until the request
 * has used the primary (read-your-writes: its later reads stay there).
 */
export class Replicas {
  private readonly list: Replica[]
  private next = 0
  private timer: NodeJS.Timeout | null = null
  private checking: Promise<void> | null = null
  /** The primary's WAL position at recent checks, oldest first. */
  private readonly samples: LsnSample[] = []
  /** A request's second lease, on a replica (request.db.replica), by its primary lease. */
  private readonly side = new WeakMap<Lease, Lease>()
  readonly intervalMs: number

  constructor (private readonly primary: ClientGate, private readonly options: ResolvedOptions, private readonly log: FastifyBaseLogger,
    redact: (text: string) => string, Client: typeof pg.Client) {
    this.list = options.replicas.map(({ connection, target }) => {
      const pool = new pg.Pool({
        ...connection,
        password: connection.password,
        max: options.max,
        idleTimeoutMillis: options.idleTimeoutMs,
        Client,
        ...(options.statementTimeoutMs > 0 ? { statement_timeout: options.statementTimeoutMs } : {})
      })
      // An idle client whose replica went away: logged, never an uncaught 'error'.
      const replica = new Replica(target, pool, options, log, redact, primary)
      pool.on('error', (err) => {
        log.warn({ replica: target, err: { type: err.name, message: redact(err.message), code: (err as { code?: string }).code } },
          'fastify-request-db: an idle replica connection failed and was removed from its pool')
        replica.markUnusable('an idle connection to it failed')
      })
      return replica
    })
    // Often enough that a replica falling behind is noticed well within the bound.
    this.intervalMs = Math.min(1000, Math.max(50, Math.floor(options.maxReplicaLagMs / 4)))
  }

  /** A usable replica's gate, round robin; null when none is usable. */
  pick (): ClientGate | null {
    const list = this.list
    for (let i = 0; i < list.length; i++) {
      const replica = list[(this.next + i) % list.length]
      if (replica.usable) {
        this.next = (this.next + i + 1) % list.length
        return replica.gate
      }
    }
    return null
  }

  /** `request.db.replica` of the request whose primary lease is `lease`. */
  readsFor (lease: Lease): ReplicaReads {
    // Read-your-writes: once the request used the primary, its reads stay there. A route
    // transaction reads inside its transaction.
    if (lease.hasTakenClient || lease.isTransactionRoute()) return lease
    let side = this.side.get(lease)
    if (side === undefined) {
      const gate = this.pick()
      if (gate === null) return lease
      side = lease.sibling(gate)
      this.side.set(lease, side)
    }
    return side
  }

  /** onSend: the side lease goes back as the primary one does. */
  sideLeaseOf (lease: Lease): Lease | undefined {
    return this.side.get(lease)
  }

  status (): ReplicaStatus[] {
    return this.list.map((r) => ({ name: r.name, usable: r.usable, lagMs: r.lagMs, reason: r.reason, stats: r.gate.stats() }))
  }

  /** The first check (awaited at startup: routes are routed right from the first request), then one every intervalMs. */
  async start (): Promise<void> {
    await this.check()
    for (const r of this.list) {
      if (!r.usable) this.log.warn({ replica: r.name, reason: r.reason }, 'fastify-request-db: a replica is not usable at startup; its reads go to the primary')
    }
    this.timer = setInterval(() => {
      if (this.checking === null) this.checking = this.check().finally(() => { this.checking = null })
    }, this.intervalMs)
    this.timer.unref()
  }

  async stop (): Promise<void> {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
    await this.checking
  }

  gates (): ClientGate[] {
    return this.list.map((r) => r.gate)
  }

  async endPools (): Promise<void> {
    await Promise.all(this.list.map((r) => r.pool.end()))
  }

  /**
   * Each replica's lag, from LSNs and pg_last_xact_replay_timestamp(). The primary's WAL position is
   * sampled at every check; a replica that has replayed past the newest sample lags 0. Otherwise
   * its lag is the time since the first sample it has not reached (the primary had moved past
   * where the replica stands by then: accurate to one check interval). When even the oldest sample
   * kept is ahead of it, how long ago the primary passed that point is not known, and the time
   * since the last transaction it replayed was committed (pg_last_xact_replay_timestamp) is used:
   * an upper bound, which grows while replay stalls and the primary writes on. (That timestamp
   * alone would call a replica of a primary idle for an hour an hour behind for the moment it
   * takes to replay the first write.)
   */
  private async check (): Promise<void> {
    const primaryLsn = await this.primaryLsn()
    const now = performance.now()
    const samples = this.samples
    if (primaryLsn !== null) samples.push({ lsn: primaryLsn, at: now })
    const keepMs = this.options.maxReplicaLagMs + 3 * this.intervalMs
    while (samples.length > 1 && now - samples[0].at > keepMs) samples.shift()
    await Promise.all(this.list.map(async (replica) => {
      try {
        const { rows: [row] } = await replica.pool.query({
          text: `SELECT pg_is_in_recovery() AS recovery, pg_last_wal_replay_lsn()::text AS replayed,
              (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000)::float8 AS since_replay_ms`,
          query_timeout: CHECK_TIMEOUT_MS
        } as pg.QueryConfig)
        if (row.recovery !== true) {
          replica.markUnusable('it is not in recovery (not a replica, or promoted)')
          return
        }
        const lagMs = lagOf(row.replayed === null ? null : lsnValue(row.replayed), row.since_replay_ms, samples, now)
        replica.lagMs = lagMs
        if (lagMs === null) {
          replica.markUnusable('it is behind the primary, by an unknown time')
        } else if (lagMs > this.options.maxReplicaLagMs) {
          replica.markUnusable(`it lags ${lagMs} ms behind the primary (maxReplicaLagMs=${this.options.maxReplicaLagMs})`)
        } else {
          replica.markUsable(lagMs)
        }
      } catch (err) {
        replica.lagMs = null
        replica.markUnusable(`the check failed (${this.primary.redact((err as Error).message)})`)
      }
    }))
  }

  /** The primary's WAL position now; null if it can't be read (then lag is judged by time alone). */
  private async primaryLsn (): Promise<bigint | null> {
    try {
      const client = await this.primary.acquire(CHECKER)
      try {
        return lsnValue((await client.query('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0].lsn)
      } finally {
        this.primary.release(CHECKER, client, false)
      }
    } catch {
      return null
    }
  }
}

interface LsnSample { lsn: bigint, at: number }

/** A replica's lag in ms (see Replicas.check), or null when it can't be told. */
export function lagOf (replayed: bigint | null, sinceReplayMs: number | null, samples: readonly LsnSample[], now: number): number | null {
  const byTime = sinceReplayMs === null ? null : Math.max(0, Math.round(sinceReplayMs))
  if (replayed === null || samples.length === 0) return byTime
  const first = samples.findIndex((sample) => sample.lsn > replayed)
  if (first === -1) return 0
  if (first > 0) return Math.max(0, Math.round(now - samples[first].at))
  return byTime
}

/** 'X/Y' (two hex numbers) as one number. */
function lsnValue (text: string): bigint {
  const [high, low] = text.split('/')
  return (BigInt(`0x${high}`) << 32n) | BigInt(`0x${low}`)
}

// The background check's holder on the primary: never a request's lease.
const CHECKER: ClientHolder = {
  countsAsLease: false,
  request: null,
  connectionFailed () {},
  forceRelease () {},
  checkStillWanted () {}
}

/**
 * Replicas for the app: their pools and gates, the check, the hooks that route `readOnly` routes
 * and give side leases back, and their shutdown. Only apps with `replicaUrls` run any of this.
 */
export async function addReplicas (fastify: FastifyInstance, primary: ClientGate, options: ResolvedOptions,
  redact: (text: string) => string, Client: typeof pg.Client): Promise<Replicas> {
  const replicas = new Replicas(primary, options, fastify.log, redact, Client)
  primary.replicas = replicas
  // Added first: onClose hooks run last-added first, so the pools end after every client is back.
  fastify.addHook('onClose', async () => {
    await replicas.stop()
    await replicas.endPools()
  })
  fastify.addHook('preClose', (done) => {
    void replicas.stop()
    done()
  })
  for (const gate of replicas.gates()) addShutdownHooks(fastify, gate, options.shutdownTimeoutMs)

  fastify.addHook('onRequest', function routeReadOnly (request, reply, done) {
    if ((request.routeOptions.config as { db?: RouteDbConfig }).db?.readOnly === true) {
      const gate = replicas.pick()
      const lease = leaseOf(request)
      if (gate !== null && lease !== undefined) setLease(request, lease.sibling(gate))
    }
    done()
  })
  fastify.addHook('onSend', function releaseSideLease (request: FastifyRequest, reply, payload, done) {
    const lease = leaseOf(request)
    if (lease !== undefined) replicas.sideLeaseOf(lease)?.releaseEarly(payload)
    done(null, payload)
  })
  await replicas.start()
  return replicas
}
