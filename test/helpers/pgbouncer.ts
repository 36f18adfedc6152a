// Whether the PgBouncer suites can run here, said out loud in the TAP output when they can't.
import { PGBOUNCER_MISSING, pgbouncerPath } from '../../scripts/pgbouncer.mjs'

type Reporter = {
  fail (message: string): unknown
  comment (message: string): unknown
  pass (message: string, extra: { skip: boolean }): unknown
}

/**
 * True when `pgbouncer` is installed. Otherwise false, and the output says which suite did not run
 * and how to install it: a failure under REQUIRE_PGBOUNCER=1 (CI), a visible skip elsewhere.
 */
export function havePgBouncer (t: Reporter, suite: string): boolean {
  if (pgbouncerPath() !== null) return true
  if (process.env.REQUIRE_PGBOUNCER === '1') {
    t.fail(`${suite} cannot run: ${PGBOUNCER_MISSING}. REQUIRE_PGBOUNCER=1 makes that a failure.`)
  } else {
    t.comment(`NOT RUN: ${suite}. ${PGBOUNCER_MISSING}`)
    t.pass(`${suite} did not run: ${PGBOUNCER_MISSING}`, { skip: true })
  }
  return false
}
