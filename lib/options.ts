import type { PostgresPool } from './postgres-pool.js'
import type { DbContextFunction } from './request-context.js'
import { FST_REQUEST_DB_INVALID_OPTION } from './errors.js'
import { redactUrl } from './redact.js'

/** Where environment variables are read from: `process.env` unless `options.env` says otherwise. */
export type Env = Readonly<Record<string, string | undefined>>

/** Options for `app.register(requestDb, options)`. Explicit options win over env; env over defaults. */
export interface RequestDbOptions {
  /**
   * PostgreSQL connection URL, e.g. `postgres://user:pass@localhost:5432/app?sslmode=require`.
   * Env: `DATABASE_URL`. Default: none, then the libpq variables `PGHOST`, `PGPORT`, `PGUSER`,
   * `PGPASSWORD`, `PGDATABASE` (with libpq's defaults: localhost, 5432).
   */
  connectionString?: string
  /** Most clients the pool opens. Env: `DB_POOL_MAX`. Default: 10. */
  max?: number
  /** Longest wait for a free client before answering 503. Env: `DB_ACQUIRE_TIMEOUT_MS`. Default: 5000. */
  acquireTimeoutMs?: number
  /** Idle clients are closed after this long; 0 keeps them. Env: `DB_IDLE_TIMEOUT_MS`. Default: 10000. */
  idleTimeoutMs?: number
  /** Server-side `statement_timeout`; 0 is off. Env: `DB_STATEMENT_TIMEOUT_MS`. Default: 0. */
  statementTimeoutMs?: number
  /**
   * How long `app.close()` waits for requests' clients before cancelling their queries.
   * Env: `DB_SHUTDOWN_TIMEOUT_MS`. Default: 10000.
   */
  shutdownTimeoutMs?: number
  /**
   * When the HTTP client goes away while a statement runs, how long the statement may finish on
   * its own before it is cancelled on the server. A cancel costs the connection (it is closed, never
   * reused), so cancelling at once under many hang-ups together replaced every busy connection.
   * Env: `DB_ABORT_GRACE_MS`. Default: 250.
   */
  abortGraceMs?: number
  /**
   * Most requests that may wait for a client at once; one more is answered 503 at once.
   * Env: `DB_POOL_MAX_WAITING`. Default: unlimited (the wait is still bounded by `acquireTimeoutMs`).
   */
  maxWaiting?: number
  /**
   * At startup, how long to keep trying to reach the database (backoff from 250 ms doubling to
   * 5 s, each failed try logged) before `ready()` rejects; containers often start before their
   * database. 0 tries once. Env: `DB_CONNECT_TIMEOUT_MS`. Default: 0.
   */
  connectTimeoutMs?: number
  /**
   * A request holding its connection longer than this logs a warning (request id, method, route,
   * age, the last statement's text without its values), and a second line when it gives it back.
   * 0 is off. Env: `DB_LEAK_DETECTION_MS`. Default: 0.
   */
  leakDetectionMs?: number
  /**
   * Add `db: { queries, ms, waitMs }` to Fastify's "request completed" log line: the request's
   * statements, the time they ran, and the time spent waiting for a connection.
   * Env: `DB_LOG_TIME` (`true`/`false`, `1`/`0`). Default: false.
   */
  logDbTime?: boolean
  /**
   * Send a `Server-Timing` header with the same figures (`db;dur=…;desc="3 queries", db-wait;dur=…`),
   * as they stand when the headers go. Env: `DB_SERVER_TIMING`. Default: false.
   */
  serverTiming?: boolean
  /**
   * An existing `pg.Pool` to use instead of creating one. The plugin does not end it on close: its
   * owner does. Default: the pool `@fastify/postgres` creates (or the app's `fastify.pg.pool`).
   */
  pool?: PostgresPool
  /** Where environment variables are read. Default: `process.env`. */
  env?: Env
  /**
   * Each request's database identity, for row-level security: `(request) => ({ settings:
   * { 'app.tenant_id': … }, role: 'tenant_user' })`, or null for none; may be async. A request with
   * a context runs its statements in a transaction (as `config.db.transaction` does) that opens
   * with `set_config(name, value, true)` for each setting and the role, bound as parameters, in the
   * round trip of its BEGIN. A route overrides it with `config.db.context` (a function, or `false`).
   * Env: none. Default: none.
   */
  context?: DbContextFunction
  /**
   * The roles a context may set (exact names); any other is refused with
   * `FST_REQUEST_DB_INVALID_CONTEXT`. Env: none. Default: none (a context can't set a role).
   */
  contextRoles?: readonly string[]
  /**
   * What sits between the app and PostgreSQL. `'transaction'`: a pooler in transaction mode
   * (PgBouncer `pool_mode = transaction`), which gives each transaction whichever server connection
   * is free. Session-level state outside a transaction is then refused before it is sent, `SET`
   * inside one becomes `SET LOCAL`, named prepared statements run unnamed, and `statementTimeoutMs`
   * is refused at startup ([docs/pgbouncer.md](../docs/pgbouncer.md)). Env: `DB_POOLER`.
   * Default: `'none'`.
   */
  pooler?: 'none' | 'transaction'
  /**
   * Read replicas (`postgres://…` URLs), one pool each, for routes with `config.db.readOnly` and for
   * `request.db.replica` ([docs/replicas.md](../docs/replicas.md)). Env: `DATABASE_REPLICA_URLS`
   * (comma-separated). Default: none.
   */
  replicaUrls?: string[]
  /**
   * A replica further behind the primary than this (checked in the background) is not used: its
   * reads go to the primary until it catches up. Env: `DB_MAX_REPLICA_LAG_MS`. Default: 5000.
   */
  maxReplicaLagMs?: number
}

/** Connection settings handed to `pg`. */
export interface ConnectionConfig {
  connectionString?: string
  host?: string
  port?: number
  user?: string
  password?: string
  database?: string
}

/** The options after defaults, env and explicit values were merged and checked. Frozen. */
export interface ResolvedOptions {
  readonly connection: Readonly<ConnectionConfig>
  /** `host:port/database`, for messages: never the password. */
  readonly target: string
  readonly max: number
  readonly acquireTimeoutMs: number
  readonly idleTimeoutMs: number
  readonly statementTimeoutMs: number
  readonly shutdownTimeoutMs: number
  readonly abortGraceMs: number
  readonly maxWaiting: number
  readonly connectTimeoutMs: number
  readonly leakDetectionMs: number
  readonly logDbTime: boolean
  readonly serverTiming: boolean
  readonly pool: PostgresPool | undefined
  /** The app's context function, or null. */
  readonly context: DbContextFunction | null
  /** The roles a context may set. */
  readonly contextRoles: ReadonlySet<string>
  readonly pooler: 'none' | 'transaction'
  /** Each replica's connection settings and `host:port/database` name. */
  readonly replicas: ReadonlyArray<{ readonly connection: Readonly<ConnectionConfig>, readonly target: string }>
  readonly maxReplicaLagMs: number
  /** Strings that must never reach a message or a log line. */
  readonly secrets: readonly string[]
}

const DEFAULTS = {
  max: 10,
  acquireTimeoutMs: 5000,
  idleTimeoutMs: 10000,
  statementTimeoutMs: 0,
  shutdownTimeoutMs: 10000,
  abortGraceMs: 250,
  maxWaiting: Number.POSITIVE_INFINITY,
  connectTimeoutMs: 0,
  leakDetectionMs: 0,
  maxReplicaLagMs: 5000
} as const

const FLAG_DEFAULTS = {
  logDbTime: false,
  serverTiming: false
} as const

// setTimeout's ceiling: a larger delay fires at once, which would turn a long timeout into none.
const MAX_TIMER_MS = 2_147_483_647

interface IntegerSetting {
  option: keyof typeof DEFAULTS
  env: string
  min: number
  max: number
}

const INTEGER_SETTINGS: readonly IntegerSetting[] = [
  { option: 'max', env: 'DB_POOL_MAX', min: 1, max: 10_000 },
  // 0 would mean "wait forever" to pg-pool: the one default that must never hang.
  { option: 'acquireTimeoutMs', env: 'DB_ACQUIRE_TIMEOUT_MS', min: 1, max: MAX_TIMER_MS },
  { option: 'idleTimeoutMs', env: 'DB_IDLE_TIMEOUT_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'statementTimeoutMs', env: 'DB_STATEMENT_TIMEOUT_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'shutdownTimeoutMs', env: 'DB_SHUTDOWN_TIMEOUT_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'abortGraceMs', env: 'DB_ABORT_GRACE_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'maxWaiting', env: 'DB_POOL_MAX_WAITING', min: 0, max: 1_000_000 },
  { option: 'connectTimeoutMs', env: 'DB_CONNECT_TIMEOUT_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'leakDetectionMs', env: 'DB_LEAK_DETECTION_MS', min: 0, max: MAX_TIMER_MS },
  { option: 'maxReplicaLagMs', env: 'DB_MAX_REPLICA_LAG_MS', min: 0, max: MAX_TIMER_MS }
]

interface FlagSetting {
  option: keyof typeof FLAG_DEFAULTS
  env: string
}

const FLAG_SETTINGS: readonly FlagSetting[] = [
  { option: 'logDbTime', env: 'DB_LOG_TIME' },
  { option: 'serverTiming', env: 'DB_SERVER_TIMING' }
]

const KNOWN_OPTIONS = new Set<string>([
  'connectionString', 'pool', 'env', 'context', 'contextRoles', 'pooler', 'replicaUrls', ...INTEGER_SETTINGS.map((s) => s.option), ...FLAG_SETTINGS.map((s) => s.option)
])

const SSL_MODES = new Set(['disable', 'prefer', 'require', 'verify-ca', 'verify-full', 'no-verify'])

/**
 * Merge defaults, env and explicit options (in that order of strength) and check every value.
 * Throws FST_REQUEST_DB_INVALID_OPTION naming the setting and its value (passwords masked).
 */
export function resolveOptions (options: RequestDbOptions = {}, env: Env = options.env ?? process.env): ResolvedOptions {
  if (options === null || typeof options !== 'object') {
    throw new FST_REQUEST_DB_INVALID_OPTION('options', describe(options), 'must be an object')
  }
  for (const key of Object.keys(options)) {
    if (!KNOWN_OPTIONS.has(key)) {
      throw new FST_REQUEST_DB_INVALID_OPTION('options', key, `is not an option (known: ${[...KNOWN_OPTIONS].join(', ')})`)
    }
  }

  const numbers = {} as Record<IntegerSetting['option'], number>
  for (const setting of INTEGER_SETTINGS) {
    numbers[setting.option] = resolveInteger(setting, options[setting.option], env[setting.env])
  }
  const flags = {} as Record<FlagSetting['option'], boolean>
  for (const setting of FLAG_SETTINGS) {
    flags[setting.option] = resolveFlag(setting, options[setting.option], env[setting.env])
  }

  const pool = options.pool
  if (pool !== undefined && (pool === null || typeof pool.connect !== 'function' || typeof pool.on !== 'function')) {
    throw new FST_REQUEST_DB_INVALID_OPTION('pool', describe(pool), 'must be a pg.Pool')
  }

  const context = options.context ?? null
  if (context !== null && typeof context !== 'function') {
    throw new FST_REQUEST_DB_INVALID_OPTION('context', describe(context), 'must be a function of the request')
  }
  const contextRoles = resolveRoles(options.contextRoles)

  const { connection, target, secrets } = resolveConnection(options, env)
  const pooler = resolvePooler(options.pooler, env.DB_POOLER)
  if (pooler === 'transaction' && numbers.statementTimeoutMs > 0) {
    // PgBouncer refuses statement_timeout as a startup parameter, and SET LOCAL would cover only
    // the transactions the plugin opens: refused rather than half applied.
    throw new FST_REQUEST_DB_INVALID_OPTION('statementTimeoutMs', String(numbers.statementTimeoutMs),
      'cannot be applied with pooler=transaction (PgBouncer refuses statement_timeout as a startup parameter): set it on the server instead, ALTER ROLE … SET statement_timeout = …')
  }
  const replicas = resolveReplicas(options.replicaUrls, env.DATABASE_REPLICA_URLS, env, secrets)

  return Object.freeze({
    connection: Object.freeze(connection),
    target,
    max: numbers.max,
    acquireTimeoutMs: numbers.acquireTimeoutMs,
    idleTimeoutMs: numbers.idleTimeoutMs,
    statementTimeoutMs: numbers.statementTimeoutMs,
    shutdownTimeoutMs: numbers.shutdownTimeoutMs,
    abortGraceMs: numbers.abortGraceMs,
    maxWaiting: numbers.maxWaiting,
    connectTimeoutMs: numbers.connectTimeoutMs,
    leakDetectionMs: numbers.leakDetectionMs,
    logDbTime: flags.logDbTime,
    serverTiming: flags.serverTiming,
    pool,
    context,
    contextRoles,
    pooler,
    replicas: Object.freeze(replicas),
    maxReplicaLagMs: numbers.maxReplicaLagMs,
    secrets: Object.freeze(secrets)
  })
}

function resolvePooler (explicit: unknown, fromEnv: string | undefined): 'none' | 'transaction' {
  const [setting, value] = explicit !== undefined ? ['pooler', explicit] : ['DB_POOLER', fromEnv?.trim()]
  if (value === undefined) return 'none'
  if (value === 'none' || value === 'transaction') return value
  throw new FST_REQUEST_DB_INVALID_OPTION(setting, describe(value), 'must be "none" or "transaction"')
}

function resolveReplicas (explicit: unknown, fromEnv: string | undefined, env: Env, secrets: string[]): Array<{ connection: ConnectionConfig, target: string }> {
  let urls: unknown[]
  let setting: string
  if (explicit !== undefined) {
    if (!Array.isArray(explicit)) throw new FST_REQUEST_DB_INVALID_OPTION('replicaUrls', describe(explicit), 'must be an array of postgres:// URLs')
    urls = explicit
    setting = 'replicaUrls'
  } else {
    urls = fromEnv === undefined ? [] : fromEnv.split(',').map((url) => url.trim()).filter((url) => url !== '')
    setting = 'DATABASE_REPLICA_URLS'
  }
  return urls.map((url, i) => {
    const replica = resolveConnection({ connectionString: url as string }, env, `${setting}[${i}]`)
    // Gathered here too, so a replica's password is masked like the primary's.
    for (const secret of replica.secrets) if (!secrets.includes(secret)) secrets.push(secret)
    return { connection: Object.freeze(replica.connection), target: replica.target }
  })
}

function resolveInteger (setting: IntegerSetting, explicit: unknown, fromEnv: string | undefined): number {
  if (explicit !== undefined) {
    if (typeof explicit !== 'number' || !Number.isInteger(explicit) || explicit < setting.min || explicit > setting.max) {
      throw new FST_REQUEST_DB_INVALID_OPTION(setting.option, describe(explicit), range(setting))
    }
    return explicit
  }
  if (fromEnv !== undefined) {
    // Digits only: Number() would accept '', ' ', '0x10', '1e3' and 'Infinity'.
    const trimmed = fromEnv.trim()
    const value = /^\d{1,16}$/.test(trimmed) ? Number(trimmed) : Number.NaN
    if (!(value >= setting.min && value <= setting.max)) {
      throw new FST_REQUEST_DB_INVALID_OPTION(setting.env, describe(fromEnv), range(setting))
    }
    return value
  }
  return DEFAULTS[setting.option]
}

function resolveFlag (setting: FlagSetting, explicit: unknown, fromEnv: string | undefined): boolean {
  if (explicit !== undefined) {
    if (typeof explicit !== 'boolean') throw new FST_REQUEST_DB_INVALID_OPTION(setting.option, describe(explicit), 'must be true or false')
    return explicit
  }
  if (fromEnv !== undefined) {
    const value = fromEnv.trim().toLowerCase()
    if (value === 'true' || value === '1') return true
    if (value === 'false' || value === '0') return false
    throw new FST_REQUEST_DB_INVALID_OPTION(setting.env, describe(fromEnv), 'must be true, false, 1 or 0')
  }
  return FLAG_DEFAULTS[setting.option]
}

// Reserved by PostgreSQL: `none` would reset the role, `public` is every role.
const RESERVED_ROLES = new Set(['none', 'public'])

function resolveRoles (roles: unknown): ReadonlySet<string> {
  if (roles === undefined) return new Set()
  if (!Array.isArray(roles)) throw new FST_REQUEST_DB_INVALID_OPTION('contextRoles', describe(roles), 'must be an array of role names')
  for (const role of roles) {
    if (typeof role !== 'string' || role === '' || Buffer.byteLength(role) > 63 || role.includes('\0') || RESERVED_ROLES.has(role.toLowerCase())) {
      throw new FST_REQUEST_DB_INVALID_OPTION('contextRoles', describe(role), 'each must be a role name (1 to 63 bytes; not none or public)')
    }
  }
  return new Set(roles as string[])
}

function range (setting: IntegerSetting): string {
  return `must be a whole number from ${setting.min} to ${setting.max}`
}

function resolveConnection (options: RequestDbOptions, env: Env, name = 'connectionString'): {
  connection: ConnectionConfig
  target: string
  secrets: string[]
} {
  const secrets: string[] = []
  const password = env.PGPASSWORD
  if (password) secrets.push(password)

  const portText = env.PGPORT
  let port = 5432
  if (portText !== undefined && portText !== '') {
    port = /^\d{1,5}$/.test(portText.trim()) ? Number(portText.trim()) : Number.NaN
    if (!(port >= 1 && port <= 65535)) {
      throw new FST_REQUEST_DB_INVALID_OPTION('PGPORT', describe(portText), 'must be a port number from 1 to 65535')
    }
  }
  const user = env.PGUSER || env.USER || undefined
  // libpq's defaults, spelled out so pg never falls back to process.env when options.env is given.
  const connection: ConnectionConfig = {
    host: env.PGHOST || 'localhost',
    port,
    user,
    password,
    database: env.PGDATABASE || user
  }

  const [setting, url] = options.connectionString !== undefined
    ? [name, options.connectionString as unknown]
    : ['DATABASE_URL', env.DATABASE_URL as unknown]

  if (url !== undefined) {
    const parsed = parseConnectionString(setting, url, secrets)
    connection.connectionString = url as string
    const host = parsed.searchParams.get('host') ?? (parsed.hostname ? decodeURIComponent(parsed.hostname) : connection.host)
    const database = parsed.pathname.length > 1 ? decodeURIComponent(parsed.pathname.slice(1)) : connection.database
    const urlPort = parsed.port ? Number(parsed.port) : (parsed.hostname ? 5432 : connection.port)
    // pg lets the URL win over these, but what reads the pool's options does not: instrumentation-pg
    // names the pool in its metrics from host, port and database alone (localhost:5432/unknown_database).
    connection.host = host
    connection.port = urlPort
    connection.database = database
    return { connection, target: `${host}:${urlPort}/${database ?? ''}`, secrets }
  }
  return { connection, target: `${connection.host}:${connection.port}/${connection.database ?? ''}`, secrets }
}

function parseConnectionString (setting: string, value: unknown, secrets: string[]): URL {
  if (typeof value !== 'string') {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, describe(value), 'must be a string')
  }
  // Mask the password before anything can throw with the URL in hand.
  const shown = JSON.stringify(redactUrl(value))
  if (value.trim() === '') {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, shown, 'is empty; unset it to use the PG* variables')
  }
  let url: URL
  try {
    url = new URL(value)
  } catch {
    // An unparseable URL can't have its password found and masked, so it is not shown at all. Not
    // chained with { cause } either: Node's URL error carries the whole input.
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, `<${value.length} characters, hidden>`,
      'is not a valid URL (expected postgres://user:password@host:port/database)')
  }
  if (url.password) {
    secrets.push(url.password)
    try {
      secrets.push(decodeURIComponent(url.password))
    } catch {}
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, shown, `has protocol "${url.protocol}"; expected "postgres:" or "postgresql:"`)
  }
  if (url.port !== '' && Number(url.port) === 0) {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, shown, 'has port 0; expected 1 to 65535')
  }
  const sslmode = url.searchParams.get('sslmode')
  if (sslmode !== null && !SSL_MODES.has(sslmode)) {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, shown, `has unknown sslmode "${sslmode}" (known: ${[...SSL_MODES].join(', ')})`)
  }
  if (!url.hostname && !url.searchParams.get('host') && url.pathname.length <= 1) {
    throw new FST_REQUEST_DB_INVALID_OPTION(setting, shown, 'names neither a host nor a database')
  }
  return url
}

function describe (value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 200 ? `${value.slice(0, 200)}…` : value)
  if (typeof value === 'number' || typeof value === 'boolean' || value === null || value === undefined) return String(value)
  if (typeof value === 'object') return Array.isArray(value) ? 'an array' : 'an object'
  return typeof value
}
