/**
 * Does a statement change session state that would outlive the request on a pooled connection?
 *
 * `DISCARD ALL` on every release would be simplest, but it is a round trip per request (the
 * benchmark measured about half of a raw pool's throughput), and it also drops the prepared
 * statements pg remembers having parsed on that connection. So the text of each query is checked
 * instead, and only a connection that ran something session-scoped is closed rather than reused.
 * The check is deliberately broad (a false positive costs one reconnect, a false negative leaks
 * state): `SET` (but not `SET LOCAL` / `SET TRANSACTION`), `RESET`, `set_config(…, false)`,
 * `LISTEN`, `PREPARE`, `DECLARE`, `LOAD`, `DISCARD`, `DEALLOCATE`, temporary tables and session
 * advisory locks. (`DEALLOCATE` and `DISCARD ALL` drop the statements pg and this plugin prepared on
 * the connection while both still think them there: the next use of one would fail.)
 * What it cannot see (a function that calls `set_config` inside the server) belongs in `SET LOCAL`
 * or `set_config(…, true)` within a transaction, which ends with it.
 */

// Start of a statement: the text's start or a `;`, then any blanks and SQL comments.
const STATEMENT_START = String.raw`(?:^|;)(?:\s|--[^\n]*(?:\n|$)|/\*[\s\S]*?\*/)*`
const SESSION_STATEMENT = String.raw`(?:set\s+(?!local\b|transaction\b)|reset\b|listen\b|prepare\b|declare\b|load\b|discard\b|deallocate\b|create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b)`
// set_config(name, value, is_local): only a literal `true` as the last argument is transaction-scoped.
const SESSION_FUNCTION = String.raw`\bset_config\s*\((?![^()]*,\s*true\s*\))|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(`

const SESSION_CHANGE = new RegExp(`${STATEMENT_START}${SESSION_STATEMENT}|${SESSION_FUNCTION}`, 'i')

export function changesSessionState (sql: string): boolean {
  return SESSION_CHANGE.test(sql)
}
