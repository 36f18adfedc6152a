import createError from '@fastify/error'

// The last argument may be `{ cause }`: @fastify/error keeps it as the error's cause.
type Cause = { cause: unknown }

/**
 * Every error this plugin creates. Codes are stable and documented in the README; the HTTP status is
 * what Fastify's default error handler answers with when the error reaches it.
 */

/** A setting (option or environment variable) has a bad value. Thrown during `register()`. */
export const FST_REQUEST_DB_INVALID_OPTION = createError<'FST_REQUEST_DB_INVALID_OPTION', 500, [setting: string, value: string, reason: string]>(
  'FST_REQUEST_DB_INVALID_OPTION',
  'Invalid %s=%s: %s',
  500
)

/** The connectivity check at startup failed. `ready()` rejects with it; names host, port and database. */
export const FST_REQUEST_DB_CONNECT = createError<'FST_REQUEST_DB_CONNECT', 500, [target: string, reason: string, options?: Cause]>(
  'FST_REQUEST_DB_CONNECT',
  'Cannot connect to PostgreSQL at %s: %s',
  500
)

/** No pool client became free within `acquireTimeoutMs`. Answered with 503 and `Retry-After`. */
export const FST_REQUEST_DB_ACQUIRE_TIMEOUT = createError<'FST_REQUEST_DB_ACQUIRE_TIMEOUT', 503, [ms: number]>(
  'FST_REQUEST_DB_ACQUIRE_TIMEOUT',
  'No database connection became free within %dms',
  503
)

/** The wait queue for pool clients is full (`maxWaiting`): shed at once rather than queue. 503. */
export const FST_REQUEST_DB_OVERLOADED = createError<'FST_REQUEST_DB_OVERLOADED', 503, [waiting: number]>(
  'FST_REQUEST_DB_OVERLOADED',
  'Too many requests are waiting for a database connection (%d)',
  503
)

/** The database could not be reached, or the connection broke, while serving a request. 503. */
export const FST_REQUEST_DB_UNAVAILABLE = createError<'FST_REQUEST_DB_UNAVAILABLE', 503, [reason: string, options?: Cause]>(
  'FST_REQUEST_DB_UNAVAILABLE',
  'The database is unavailable: %s',
  503
)

/**
 * The connection this request (or `app.db` call) held broke. A statement in flight when it broke
 * fails with this; it may or may not have run, is never sent again, and every later use fails too.
 * A connection that broke between statements of a request that had set nothing living on it is
 * replaced quietly; otherwise (an open transaction, SET, temp tables, locks, the raw client, …)
 * every later use fails with this, since a new connection would run without that state. 503.
 */
export const FST_REQUEST_DB_CONNECTION_LOST = createError<'FST_REQUEST_DB_CONNECTION_LOST', 503, [reason: string, options?: Cause]>(
  'FST_REQUEST_DB_CONNECTION_LOST',
  'The database connection of this request was lost: %s',
  503
)

/** `app.close()` has begun; no new connection is handed out. 503. */
export const FST_REQUEST_DB_CLOSING = createError<'FST_REQUEST_DB_CLOSING', 503, [options?: Cause]>(
  'FST_REQUEST_DB_CLOSING',
  'The server is shutting down and hands out no new database connections',
  503
)

/** `request.db` was used after the request ended (response sent or client gone). Use `app.db`. */
export const FST_REQUEST_DB_RELEASED = createError<'FST_REQUEST_DB_RELEASED', 500, []>(
  'FST_REQUEST_DB_RELEASED',
  'request.db was used after the request ended; use app.db for background work',
  500
)

/** COMMIT of the route's transaction (`config.db.transaction`) failed; nothing was committed. 500. */
export const FST_REQUEST_DB_COMMIT_FAILED = createError<'FST_REQUEST_DB_COMMIT_FAILED', 500, [reason: string, options?: Cause]>(
  'FST_REQUEST_DB_COMMIT_FAILED',
  'The transaction could not be committed: %s',
  500
)

/**
 * A BEGIN, COMMIT or ROLLBACK sent as a statement (by a query builder's `transaction()`, or by hand)
 * that would end a transaction it did not open (the route's, or `transaction()`'s), or a nested
 * BEGIN with options a savepoint can't take. A bare nested BEGIN becomes a savepoint instead. 500.
 */
export const FST_REQUEST_DB_TRANSACTION_STATEMENT = createError<'FST_REQUEST_DB_TRANSACTION_STATEMENT', 500, [reason: string]>(
  'FST_REQUEST_DB_TRANSACTION_STATEMENT',
  'Transaction statement refused: %s',
  500
)

/**
 * The `context` function threw or rejected (a bad token, say). Nothing ran on the database. The
 * status is the thrown error's when it is a 4xx (a 401 for a bad JWT stays a 401), else 500; the
 * thrown error is the cause.
 */
export const FST_REQUEST_DB_CONTEXT_FAILED = createError<'FST_REQUEST_DB_CONTEXT_FAILED', 500, [reason: string, options?: Cause]>(
  'FST_REQUEST_DB_CONTEXT_FAILED',
  'The database context of this request could not be resolved: %s',
  500
)

/**
 * A database context the plugin will not apply: the `context` function returned something that is
 * not one (an unknown key, a setting name that is not `prefix.name`, a value that is not a string,
 * number or boolean, a role not in `contextRoles`), or the database refused it (a role that does
 * not exist). Names what was wrong, never a value. Nothing of the request ran. 500.
 */
export const FST_REQUEST_DB_INVALID_CONTEXT = createError<'FST_REQUEST_DB_INVALID_CONTEXT', 500, [reason: string, options?: Cause]>(
  'FST_REQUEST_DB_INVALID_CONTEXT',
  'Invalid database context: %s',
  500
)

/**
 * In a request (or `app.db.withContext`) with a database context, a statement that would change
 * its identity: `SET ROLE`, `RESET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ALL`,
 * `set_config('role', …)`, a `SET`/`RESET`/`set_config` of one of the context's settings, or
 * `request.db.client()`, whose statements can't be checked. Refused before it is sent. 500.
 */
export const FST_REQUEST_DB_CONTEXT_STATEMENT = createError<'FST_REQUEST_DB_CONTEXT_STATEMENT', 500, [reason: string]>(
  'FST_REQUEST_DB_CONTEXT_STATEMENT',
  'Statement refused in a request with a database context: %s',
  500
)

/**
 * With `pooler: 'transaction'`: a statement that would leave session state on a server connection
 * the pooler shares with other clients (SET outside a transaction, set_config(…, false), a session
 * advisory lock, LISTEN, PREPARE, a temporary table…) was refused before it was sent. 500.
 */
export const FST_REQUEST_DB_POOLER_REFUSED = createError<'FST_REQUEST_DB_POOLER_REFUSED', 500, [reason: string]>(
  'FST_REQUEST_DB_POOLER_REFUSED',
  'Refused behind a transaction-mode pooler: %s',
  500
)

/** Codes a client may retry after a pause: the handler answers them with `Retry-After`. */
export const RETRYABLE_CODES: ReadonlySet<string> = new Set([
  'FST_REQUEST_DB_ACQUIRE_TIMEOUT',
  'FST_REQUEST_DB_OVERLOADED',
  'FST_REQUEST_DB_UNAVAILABLE',
  'FST_REQUEST_DB_CONNECTION_LOST',
  'FST_REQUEST_DB_CLOSING'
])
