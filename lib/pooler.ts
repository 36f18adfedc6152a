import type { QueryConfig } from 'pg'
import { FST_REQUEST_DB_POOLER_REFUSED } from './errors.js'

/**
 * The rules for running behind a pooler in transaction mode (`pooler: 'transaction'`; PgBouncer's
 * `pool_mode = transaction`). The pooler hands each transaction — and each statement outside one —
 * to whichever server connection is free, and resets nothing in between. So:
 *
 * - what lives on a server connection beyond the transaction (a `SET`, `set_config(…, false)`, a
 *   role, a session advisory lock, `LISTEN`, a temporary table, `PREPARE`, a `WITH HOLD` cursor)
 *   would be found by another client's next transaction there: it is refused before it is sent;
 * - inside a transaction, a plain `SET` (`SET ROLE`, `SET SESSION AUTHORIZATION` too) is sent as
 *   `SET LOCAL`: it holds for the rest of the transaction, as the request asked, and ends with it
 *   instead of staying on the server connection after COMMIT;
 * - a named prepared statement (`{ name, text }`, what Drizzle's `.prepare()` sends) would be
 *   prepared on one server connection and looked for on another (42P05, 26000): it runs unnamed.
 *
 * Only sessions of an app with the option on come here, and only for a statement the
 * session-state check (session-state.ts) already flagged, or one with a name: the others pay
 * nothing. Statement text is read, not parsed: a server-side function that calls
 * `set_config(…, false)` can't be seen (docs/pgbouncer.md).
 */

// The start of the text: blanks and SQL comments.
const LEADING = String.raw`^(?:\s|--[^\n]*(?:\n|$)|/\*[\s\S]*?\*/)*`
// More than one statement: a `;` followed by anything but blanks. (A `;` inside a string literal
// counts too: such a text is refused when it touches session state, never wrongly let through.)
const SEVERAL = /;\s*\S/
const SESSION_SET = new RegExp(`(${LEADING})set\\s+(?:session\\s+(?!authorization\\b|characteristics\\b))?(?!local\\b|transaction\\b|constraints\\b|session\\s+characteristics\\b)`, 'i')
const SESSION_CHARACTERISTICS = new RegExp(`${LEADING}set\\s+session\\s+characteristics\\b`, 'i')
// Transaction-scoped already, or harmless: every session value behind the pooler is the default.
const HARMLESS = new RegExp(`${LEADING}(?:set\\s+(?:local|transaction|constraints)\\b|reset\\b)`, 'i')
const SET_CONFIG = /\bset_config\s*\((?![^()]*,\s*true\s*\))/i
const ADVISORY_LOCK = /\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(/i
const LISTEN = new RegExp(`${LEADING}listen\\b`, 'i')
const PREPARE = new RegExp(`${LEADING}prepare\\b`, 'i')
const DECLARE = new RegExp(`${LEADING}declare\\b`, 'i')
const WITH_HOLD = /\bwith\s+hold\b/i
const TEMP_TABLE = new RegExp(`${LEADING}create\\s+(?:(?:global|local)\\s+)?temp(?:orary)?\\b`, 'i')
const ON_COMMIT_DROP = /\bon\s+commit\s+drop\b/i

/**
 * What to send instead of `sql` behind a transaction-mode pooler, given whether a transaction is
 * open: `sql` itself, a rewritten text, or the error to fail the statement with.
 */
export function poolerStatement (sql: string, inTransaction: boolean): string | Error {
  if (SET_CONFIG.test(sql)) {
    return refused(inTransaction
      ? 'set_config(…, false) would outlive the transaction on a server connection the pooler shares: use set_config(…, true)'
      : 'set_config(…, false) would stay on a server connection the pooler shares: use set_config(…, true) inside a transaction')
  }
  if (ADVISORY_LOCK.test(sql)) {
    return refused('a session advisory lock would stay on a server connection the pooler shares (and be released by nobody): use pg_advisory_xact_lock inside a transaction')
  }
  if (HARMLESS.test(sql) && !SEVERAL.test(sql)) return sql
  if (LISTEN.test(sql)) return refused('LISTEN: notifications never reach a client through a transaction-mode pooler; listen on a direct connection to PostgreSQL')
  if (PREPARE.test(sql)) return refused('PREPARE would stay on one server connection and be looked for on another: pass { name, text } (it runs unnamed) or plain text')
  if (SEVERAL.test(sql)) return refused('a text of several statements that changes session state: send the change as a statement of its own')
  if (SESSION_CHARACTERISTICS.test(sql)) return refused('SET SESSION CHARACTERISTICS would stay on a server connection the pooler shares: use BEGIN with options, or SET TRANSACTION')
  const set = SESSION_SET.exec(sql)
  if (set !== null) {
    if (!inTransaction) return refused('SET outside a transaction would stay on a server connection the pooler shares: use it inside a transaction (route transaction or request.db.transaction), where it becomes SET LOCAL')
    // Keep what came before (comments), then `SET LOCAL` and the rest without a SESSION keyword.
    return `${set[1]}SET LOCAL ${sql.slice(set[0].length)}`
  }
  if (DECLARE.test(sql)) {
    if (inTransaction && !WITH_HOLD.test(sql)) return sql
    return refused('a cursor outside a transaction, or WITH HOLD, would stay on a server connection the pooler shares: declare it inside a transaction, without HOLD')
  }
  if (TEMP_TABLE.test(sql)) {
    if (inTransaction && ON_COMMIT_DROP.test(sql)) return sql
    return refused('a temporary table would stay on a server connection the pooler shares: create it inside a transaction with ON COMMIT DROP')
  }
  // LOAD, DISCARD, and anything else the session-state check flags.
  return refused('a statement that changes the session would affect a server connection the pooler shares')
}

function refused (reason: string): Error {
  return new FST_REQUEST_DB_POOLER_REFUSED(reason)
}

/** Statement names already seen, so a later `{ name }` without its text still runs (unnamed). */
const MAX_NAMES = 1000

/** One app's pooler rules: `gate.pooler`, null when the option is off. */
export class TransactionPooler {
  /** `poolerStatement`, for the session's use. */
  readonly statement = poolerStatement

  /** A stream whose statement would have to be rewritten (a SET): streams run their text as it is. */
  streamRefused (): Error {
    return refused('a stream (cursor) whose statement changes the session: run the SET as a statement of its own')
  }
  private readonly texts = new Map<string, string>()

  /**
   * Named statements run unnamed: `{ name, text, … }` becomes `{ text, … }`. A `{ name }` whose
   * text was seen earlier in this app gets that text back; one never seen is refused.
   */
  unnamed (query: QueryConfig): QueryConfig | Error {
    const { name, ...rest } = query
    const text = rest.text ?? this.texts.get(name as string)
    if (text === undefined) return refused(`the prepared statement "${name}" has no text, and none was seen under that name`)
    if (rest.text !== undefined && this.texts.size < MAX_NAMES) this.texts.set(name as string, text)
    rest.text = text
    return rest as QueryConfig
  }
}
