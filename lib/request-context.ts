/**
 * A request's database identity for row-level security: the settings its policies read
 * (`current_setting('app.tenant_id')`) and the role they apply to, applied as the first thing in
 * the request's transaction, transaction-local, so nothing of it outlives the transaction.
 *
 * The statement calls `set_config($1, $2, true)`, …, `set_config('role', $n, true)`: every name
 * and value a bound parameter (`set_config('role', r, true)` is what `SET LOCAL ROLE r` does, and
 * a role name sent as a value needs no quoting). It goes out in the same round trip as its BEGIN,
 * both prepared once per connection (`context-statement.ts`). A context route costs what a plain
 * route transaction costs: BEGIN (with the context), statements, COMMIT.
 *
 * In a request with a context, statements that would change that identity are refused before they
 * are sent (`StatementGuard`): `SET ROLE`, `RESET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ALL`,
 * `set_config('role', …)`, and `SET`/`RESET`/`set_config` of one of the context's own settings.
 */
import type { FastifyRequest } from 'fastify'
import type { PoolClient, QueryConfig } from 'pg'
import { BeginWithContext, type ContextShape, contextShape, isStaleStatement } from './context-statement.js'
import { FST_REQUEST_DB_CONTEXT_FAILED, FST_REQUEST_DB_CONTEXT_STATEMENT, FST_REQUEST_DB_INVALID_CONTEXT } from './errors.js'
import type { ClientGate } from './pool.js'
import { markOwn, OWN, Session, type StatementGuard } from './session.js'

/** A setting's value: sent as text (`String(value)`). */
export type DbSettingValue = string | number | boolean

/** A request's database identity. */
export interface DbContext {
  /**
   * Custom settings (`prefix.name`, e.g. `app.tenant_id`), set with `set_config(name, value, true)`:
   * policies read them with `current_setting('app.tenant_id', true)`.
   */
  settings?: Readonly<Record<string, DbSettingValue>> | null
  /** A role from `contextRoles`, set with `set_config('role', role, true)` (`SET LOCAL ROLE`). */
  role?: string | null
}

/**
 * Maps a request to its database identity; may be async (to read a verified JWT). Called once per
 * request, at its first use of `request.db`, after every hook. `null`: this request has no context.
 * A throw (or rejection) answers the request with `FST_REQUEST_DB_CONTEXT_FAILED` (its 4xx status
 * if it had one, else 500); anything else that is not a context with `FST_REQUEST_DB_INVALID_CONTEXT`.
 */
export type DbContextFunction = (request: FastifyRequest) => DbContext | null | PromiseLike<DbContext | null>

/** The context function that applies to a route: its own (`config.db.context`), none (`false`), or the app's. */
export function contextFunctionFor (appFunction: DbContextFunction | null, route: { context?: unknown } | undefined): unknown {
  const own = route?.context
  if (own === undefined) return appFunction
  return own === false ? null : own
}

/**
 * Call the context function for `request`: what it returned (a context to check, or a promise of
 * one). Throws the typed error when it is not a function or throws.
 */
export function callContext (fn: unknown, request: FastifyRequest, redact: (text: string) => string): unknown {
  if (typeof fn !== 'function') throw new FST_REQUEST_DB_INVALID_CONTEXT(`config.db.context must be a function or false, got ${kind(fn)}`)
  try {
    return fn(request)
  } catch (err) {
    throw contextFailed(err, redact)
  }
}

export function isThenable (value: unknown): value is PromiseLike<unknown> {
  return value !== null && typeof value === 'object' && typeof (value as { then?: unknown }).then === 'function'
}

/** What a context function that threw (or rejected) answers the request with. */
export function contextFailed (err: unknown, redact: (text: string) => string): Error {
  const failed = new FST_REQUEST_DB_CONTEXT_FAILED(redact(err instanceof Error ? err.message : String(err)), { cause: err })
  // A 401 for a bad token stays a 401; anything else is the server's fault.
  const status = (err as { statusCode?: unknown } | null)?.statusCode
  if (typeof status === 'number' && status >= 400 && status < 500) (failed as { statusCode: number }).statusCode = status
  return failed
}

// A custom setting: two or more identifiers joined by dots. (A bare name like `role` or
// `search_path` is a server setting, not the context's.)
const SETTING_NAME = /^[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)+$/

/**
 * Check a context, as returned by a context function or given to `app.db.withContext`. Returns
 * null for `null` (no context). Throws FST_REQUEST_DB_INVALID_CONTEXT naming what is wrong, never
 * a value.
 */
export function checkContext (value: unknown, roles: ReadonlySet<string>): AppliedContext | null {
  if (value === null) return null
  if (value === undefined) throw invalid('the context function returned undefined; return null for a request without a context')
  if (typeof value !== 'object' || Array.isArray(value)) throw invalid(`expected { settings, role } or null, got ${kind(value)}`)
  for (const key of Object.keys(value)) {
    if (key !== 'settings' && key !== 'role') throw invalid(`unknown key ${JSON.stringify(key.slice(0, 64))} (known: settings, role)`)
  }
  const { settings, role } = value as DbContext
  const values: string[] = []
  const names = new Set<string>()
  if (settings !== undefined && settings !== null) {
    if (typeof settings !== 'object' || Array.isArray(settings)) throw invalid(`settings must be an object of name: value, got ${kind(settings)}`)
    for (const name of Object.keys(settings)) {
      // Setting names are case-insensitive: two spellings of one would race.
      const lower = settingKey(name)
      if (names.has(lower)) throw invalid(`setting ${name} is given twice`)
      names.add(lower)
      values.push(name, settingValue(name, (settings as Record<string, unknown>)[name]))
    }
  }
  let hasRole = false
  if (role !== undefined && role !== null) {
    if (typeof role !== 'string') throw invalid(`role must be a string, got ${kind(role)}`)
    if (!roles.has(role)) {
      throw invalid(`role ${JSON.stringify(role.slice(0, 64))} is not in contextRoles${roles.size === 0 ? ' (none are allowed: set the contextRoles option)' : ''}`)
    }
    values.push(role)
    hasRole = true
  }
  return new AppliedContext(values, names, hasRole)
}

// Names already checked, with their lower-cased spelling: an app's context uses a few fixed names,
// checked once rather than on every request. (Bounded, should names be made up per request.)
const checkedNames = new Map<string, string>()

function settingKey (name: string): string {
  let key = checkedNames.get(name)
  if (key === undefined) {
    if (!SETTING_NAME.test(name) || name.length > 200) {
      throw invalid(`setting name ${JSON.stringify(name.slice(0, 64))} is not a custom setting name (prefix.name, e.g. app.tenant_id)`)
    }
    key = name.toLowerCase()
    if (checkedNames.size < 1024) checkedNames.set(name, key)
  }
  return key
}

function settingValue (name: string, value: unknown): string {
  if (typeof value === 'string') {
    // PostgreSQL's text can't hold one; the server would refuse the whole statement.
    if (value.includes('\0')) throw invalid(`the value of ${name} contains a NUL character`)
    return value
  }
  if ((typeof value === 'number' && Number.isFinite(value)) || typeof value === 'boolean' || typeof value === 'bigint') return String(value)
  throw invalid(`the value of ${name} is ${kind(value)}; expected a string, a finite number or a boolean`)
}

function invalid (reason: string): Error {
  return new FST_REQUEST_DB_INVALID_CONTEXT(reason)
}

function kind (value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value)
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`
}

// Where a statement starts: the text's start, a `;`, or a PL/pgSQL block's keywords (a DO block's
// `BEGIN SET ROLE …`); then blanks and comments.
const START = String.raw`(?:^|;|\$[A-Za-z_]*\$|\b(?:begin|then|else|loop)\b)(?:\s|--[^\n]*(?:\n|$)|/\*[\s\S]*?\*/)*`
const SCOPE = String.raw`(?:set|reset)\s+(?:(?:session|local)\s+)?`
// The role or the session's user, by statement or by set_config (whatever its case).
const IDENTITY = new RegExp(`${START}${SCOPE}(?:"?role"?(?![\\w$.])|"?session_authorization"?(?![\\w$.])|authorization\\b|session\\s+authorization\\b|all\\b)|\\bset_config\\s*\\(\\s*'\\s*(?:role|session_authorization)\\s*'`, 'i')
// set_config whose name is not a plain literal ($1, 'rol' || 'e', E'…'): what it sets can't be read.
const UNREADABLE_SET_CONFIG = /\bset_config\s*\((?!\s*'[^']*'\s*,)/i
const NAMED_CHANGE = new RegExp(`${START}${SCOPE}("?[A-Za-z_][\\w$]*"?(?:\\s*\\.\\s*"?[A-Za-z_][\\w$]*"?)*)|\\bset_config\\s*\\(\\s*'([^']*)'`, 'gi')
// Cheap first look: every statement the checks above refuse contains one of these.
const MAY_CHANGE = /set|author/i

const IDENTITY_REFUSED = "it would change the role or the session's user in a request with a database context (SET ROLE, RESET ROLE, SET SESSION AUTHORIZATION, RESET ALL, set_config('role', …))"

/** A checked context: the statement that applies it, and the guard that keeps it applied. */
export class AppliedContext implements StatementGuard {
  readonly failure = null
  /** Lower-cased names of the context's settings. */
  readonly names: ReadonlySet<string>
  private readonly values: string[]
  private readonly shape: ContextShape | null

  constructor (values: string[], names: ReadonlySet<string>, hasRole: boolean) {
    this.values = values
    this.names = names
    this.shape = values.length === 0 ? null : contextShape(names.size, hasRole)
  }

  /**
   * BEGIN and the context, in one round trip (a new statement object each time: pg's are
   * single-use); `prepared`: both statements prepared on the connection (not behind a transaction
   * pooler).
   */
  begin (prepared: boolean): QueryConfig {
    if (this.shape === null) return OWN.BEGIN
    return markOwn(new BeginWithContext(this.shape, this.values, prepared) as unknown as QueryConfig)
  }

  refuse (sql: string): Error | null {
    if (!MAY_CHANGE.test(sql)) return null
    if (IDENTITY.test(sql)) return new FST_REQUEST_DB_CONTEXT_STATEMENT(IDENTITY_REFUSED)
    if (UNREADABLE_SET_CONFIG.test(sql)) {
      return new FST_REQUEST_DB_CONTEXT_STATEMENT("set_config with a name that is not a literal can't be checked in a request with a database context")
    }
    if (this.names.size === 0) return null
    for (const match of sql.matchAll(NAMED_CHANGE)) {
      const name = (match[1] ?? match[2]).replace(/["\s]/g, '').toLowerCase()
      if (this.names.has(name)) return new FST_REQUEST_DB_CONTEXT_STATEMENT(`it would change ${name}, a setting of the request's database context`)
    }
    return null
  }
}

/** What every statement of a request gets once its context could not be applied. */
export class Refusal implements StatementGuard {
  readonly failure: Error

  constructor (failure: Error) {
    this.failure = failure
  }

  refuse (): Error {
    return this.failure
  }
}

/**
 * `app.db.withContext(context, fn)`: a session whose transaction opens with the context applied,
 * and whose statements the context's guard checks.
 */
export class ContextSession extends Session {
  private readonly context: AppliedContext

  constructor (gate: ClientGate, context: AppliedContext) {
    super(gate)
    this.context = context
    this.guard = context
  }

  override async control (sql: string): Promise<void> {
    if (sql !== 'BEGIN' || this.txDepth !== 0) return super.control(sql)
    const client = this.current as PoolClient
    const prepared = this.gate.pooler === null
    try {
      try {
        await this.send(client, this.context.begin(prepared))
      } catch (err) {
        if (!isStaleStatement(err) || this.broken) throw err
        // The connection's memory of its prepared statement was wrong (context-statement.ts):
        // roll back the batch's aborted transaction and send it again.
        await this.send(client, OWN.ROLLBACK)
        await this.send(client, this.context.begin(prepared))
      }
    } catch (err) {
      if (this.broken) throw err
      // As in a request (Lease.begin): pg's transaction status may not show the aborted BEGIN yet.
      this.dirty = true
      throw refusedByDatabase(err as Error, this.gate.redact)
    }
  }
}

/** The database refused to apply a context (a role that does not exist, or that the login can't take). */
export function refusedByDatabase (err: Error, redact: (text: string) => string): Error {
  return new FST_REQUEST_DB_INVALID_CONTEXT(`the database refused it (${redact(err.message)})`, { cause: err })
}
