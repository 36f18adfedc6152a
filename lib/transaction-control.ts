/**
 * BEGIN, COMMIT and ROLLBACK sent as plain statements (what Drizzle and Kysely send for their own
 * `transaction()`, and what a user may type) while the request is already inside a transaction.
 * Sent as they are, the inner COMMIT would commit the route's transaction half-way, and a handler
 * that throws afterwards would leave those rows in the database. So inside a transaction a bare
 * BEGIN opens a savepoint, and the COMMIT/ROLLBACK that closes it releases or rolls back to that
 * savepoint; a statement that would end a transaction it did not open is refused.
 */

export type TransactionStatement =
  | 'begin' // BEGIN, START TRANSACTION (with WORK/TRANSACTION)
  | 'begin-with-options' // … ISOLATION LEVEL / READ ONLY / DEFERRABLE: a savepoint can't take them
  | 'commit' // COMMIT, END
  | 'rollback' // ROLLBACK, ABORT
  | 'end-with-options' // COMMIT AND CHAIN, ROLLBACK AND CHAIN

// The first three letters, lower-cased, of each verb: beg(in), sta(rt), com(mit), end, rol(lback),
// abo(rt). SELECT, COPY, EXECUTE, RESET, ALTER… differ in one of them.
const PREFIXES = new Set(['beg', 'sta', 'com', 'end', 'rol', 'abo'].map((p) => key(p, 0)))
const STATEMENT = /^\s*(begin|start\s+transaction|commit|end|rollback|abort)(?:\s+(?:work|transaction))?(?:\s+(.*?))?\s*;?\s*$/is

/** What kind of transaction statement `sql` is, or null for any other statement. */
export function transactionStatement (sql: string): TransactionStatement | null {
  // Every statement of every request passes here: most fail one Set lookup on three character
  // codes, and the regex runs only for transaction statements (or a statement with leading blanks).
  if (!PREFIXES.has(key(sql, 0)) && !(sql.charCodeAt(0) <= 0x20)) return null
  const match = STATEMENT.exec(sql)
  if (match === null) return null
  const verb = match[1].toLowerCase()
  const rest = (match[2] ?? '').toLowerCase()
  if (verb === 'begin' || verb.startsWith('start')) return rest === '' ? 'begin' : 'begin-with-options'
  // ROLLBACK TO SAVEPOINT and the two-phase … PREPARED forms are not about this transaction's end.
  if (rest.startsWith('to ') || rest.startsWith('prepared')) return null
  // AND NO CHAIN is the default spelled out; AND CHAIN opens the next transaction at once.
  if (rest !== '' && !/^and\s+no\s+chain$/.test(rest)) return 'end-with-options'
  return verb === 'commit' || verb === 'end' ? 'commit' : 'rollback'
}

/** Three character codes from `at`, lower-cased (| 0x20), as one number. */
function key (text: string, at: number): number {
  return ((text.charCodeAt(at) | 0x20) << 16) | ((text.charCodeAt(at + 1) | 0x20) << 8) | (text.charCodeAt(at + 2) | 0x20)
}

/** The savepoint a plain BEGIN opens at `depth` (transactions already open): runTransaction's names. */
export function savepointName (depth: number): string {
  return `request_db_${depth}`
}
