/**
 * BEGIN … COMMIT, and SAVEPOINTs when already inside a transaction, for anything that can run
 * queries on one connection: a request's lease or an `app.db.transaction` call.
 */

import { savepointName } from './transaction-control.js'

export interface TransactionHost<Tx> {
  /** How many transactions / savepoints are open on the connection now. */
  txDepth: number
  /** Run a statement on the host's connection (transaction control only: no values). */
  control (sql: string): Promise<unknown>
  /** What the callback receives: the same query/transaction methods. */
  readonly tx: Tx
  /** ROLLBACK itself failed: the connection's state is unknown; the caller's error still wins. */
  rollbackFailed (rollbackError: unknown, cause: unknown): void
}

export async function runTransaction<Tx, T> (host: TransactionHost<Tx>, fn: (tx: Tx) => Promise<T> | T): Promise<T> {
  if (typeof fn !== 'function') throw new TypeError('transaction(fn): fn must be a function')
  const depth = host.txDepth
  // Savepoint names only need to be unique among the open ones: the depth is.
  const savepoint = depth === 0 ? null : savepointName(depth)
  await host.control(savepoint === null ? 'BEGIN' : `SAVEPOINT ${savepoint}`)
  host.txDepth = depth + 1
  let result: T
  try {
    result = await fn(host.tx)
  } catch (err) {
    host.txDepth = depth
    try {
      await host.control(savepoint === null ? 'ROLLBACK' : `ROLLBACK TO SAVEPOINT ${savepoint}`)
      if (savepoint !== null) await host.control(`RELEASE SAVEPOINT ${savepoint}`)
    } catch (rollbackError) {
      host.rollbackFailed(rollbackError, err)
    }
    throw err
  }
  host.txDepth = depth
  // A failed COMMIT ends the transaction on the server (it rolls back): its error is the caller's.
  await host.control(savepoint === null ? 'COMMIT' : `RELEASE SAVEPOINT ${savepoint}`)
  return result
}
