import type { QueryConfig, QueryResult, QueryResultRow } from 'pg'
import { checkHealth, type DbHealth, type DbHealthOptions } from './observability/health.js'
import type { ClientGate, DbStats } from './pool.js'
import { FST_REQUEST_DB_INVALID_CONTEXT } from './errors.js'
import type { PostgresPool } from './postgres-pool.js'
import { checkContext, ContextSession, type DbContext } from './request-context.js'
import type { ReplicaStatus } from './replicas.js'
import { type DbSession, Session } from './session.js'
import { isSubmittable } from './streams.js'

/** `app.db`: the app's pool, for work outside a request (startup, background jobs). */
export interface AppDb {
  /** The one pool of the app. */
  readonly pool: PostgresPool
  /** `host:port/database`, never the password: the pool's name in logs and metrics. */
  readonly name: string
  /** Run one statement on a pool client. */
  query<R extends QueryResultRow = any, V extends unknown[] = unknown[]> (
    text: string | QueryConfig<V>, values?: V
  ): Promise<QueryResult<R>>
  /** BEGIN … COMMIT on one pool client; ROLLBACK and rethrow if `fn` throws. */
  transaction<T> (fn: (tx: DbSession) => Promise<T> | T): Promise<T>
  /**
   * `transaction(fn)` as a request with this database context: the transaction opens with its
   * settings and role applied (one round trip with BEGIN), and statements that would change them
   * are refused. (`query` and `transaction` outside a request have no context.)
   */
  withContext<T> (context: DbContext, fn: (tx: DbSession) => Promise<T> | T): Promise<T>
  /**
   * `{ total, idle, waiting, leased, leaksDetected }`: leased is the clients held by requests right
   * now; leaksDetected counts requests reported by `leakDetectionMs`.
   */
  stats (): DbStats
  /**
   * For readiness probes: `SELECT 1` on a pool client within `timeoutMs` (default
   * `acquireTimeoutMs`). Resolves `{ ok, latencyMs, pool }`, with `error: { code, message }` when
   * not ok (credentials masked). Never rejects.
   */
  health (options?: DbHealthOptions): Promise<DbHealth>
  /**
   * The read replicas (`replicaUrls`) as the background check last saw them: `{ name, usable,
   * lagMs, reason, stats }` each. Empty when there are none.
   */
  readonly replicas: ReplicaStatus[]
}

export class AppDatabase implements AppDb {
  readonly name: string
  private readonly gate: ClientGate

  constructor (gate: ClientGate, name: string) {
    this.gate = gate
    this.name = name
  }

  get pool (): PostgresPool {
    return this.gate.pool
  }

  // Through the gate rather than pool.query: the same acquire timeout, typed errors and
  // session-state rule as requests get.
  query<R extends QueryResultRow = any, V extends unknown[] = unknown[]> (text: string | QueryConfig<V>, values?: V): Promise<QueryResult<R>> {
    if (isSubmittable(text)) {
      // The client would go back as soon as this returned, under the running stream.
      return Promise.reject(new TypeError('app.db.query() takes no stream: run it as tx.query(stream) inside app.db.transaction() and wait for its end there'))
    }
    return this.withSession((session) => session.query<R, V>(text, values))
  }

  transaction<T> (fn: (tx: DbSession) => Promise<T> | T): Promise<T> {
    return this.withSession((session) => session.transaction(fn))
  }

  withContext<T> (context: DbContext, fn: (tx: DbSession) => Promise<T> | T): Promise<T> {
    let session: ContextSession
    try {
      const checked = checkContext(context, this.gate.contextRoles)
      if (checked === null) throw new FST_REQUEST_DB_INVALID_CONTEXT('app.db.withContext(context, fn) needs a context, not null: use app.db.transaction(fn)')
      session = new ContextSession(this.gate, checked)
    } catch (err) {
      return Promise.reject(err)
    }
    return this.withSession((tx) => tx.transaction(fn), session)
  }

  stats (): DbStats {
    return this.gate.stats()
  }

  get replicas (): ReplicaStatus[] {
    return this.gate.replicas?.status() ?? []
  }

  health (options?: DbHealthOptions): Promise<DbHealth> {
    return checkHealth(this.gate, options)
  }

  private async withSession<T> (work: (session: Session) => Promise<T>, session = new Session(this.gate)): Promise<T> {
    await session.open()
    try {
      return await work(session)
    } finally {
      await session.close()
    }
  }
}
