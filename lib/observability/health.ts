import { now } from '../clock.js'
import { FST_REQUEST_DB_UNAVAILABLE } from '../errors.js'
import type { ClientGate, DbStats } from '../pool.js'
import { Session } from '../session.js'

/** What `app.db.health()` resolves to. */
export interface DbHealth {
  /** A pool client answered `SELECT 1` within the deadline. */
  ok: boolean
  /** The `SELECT 1` round trip in ms (the wait for a client not included); null when none came back. */
  latencyMs: number | null
  /** `app.db.stats()` as the check ended. */
  pool: DbStats
  /** Why not ok: the error's code (`FST_REQUEST_DB_UNAVAILABLE`, `FST_REQUEST_DB_CLOSING`, a SQLSTATE…) and message, credentials masked. */
  error?: { code: string | undefined, message: string }
}

/** Options for `app.db.health()`. */
export interface DbHealthOptions {
  /** Deadline for the whole check: the wait for a client and the `SELECT 1`. Default: `acquireTimeoutMs`. */
  timeoutMs?: number
}

// setTimeout's ceiling (options.ts has the same): a larger delay fires at once.
const MAX_TIMER_MS = 2_147_483_647

/**
 * The check a readiness probe needs: one `SELECT 1` on a pool client, as requests get them (same
 * queue, same typed errors, refused once `close()` has begun). Never throws, and never takes
 * longer than its deadline: a probe that hangs on a dead network would tell nobody anything, and
 * @fastify/under-pressure's periodic check stops re-arming while one is pending.
 */
export async function checkHealth (gate: ClientGate, options: DbHealthOptions = {}): Promise<DbHealth> {
  const asked = options?.timeoutMs
  const timeoutMs = typeof asked === 'number' && asked > 0 ? Math.min(Math.ceil(asked), MAX_TIMER_MS) : gate.acquireTimeoutMs
  const probe = new Probe(gate)
  let latencyMs: number | null = null
  const check = (async () => {
    try {
      await probe.open()
      if (probe.abandoned) return
      const sent = now()
      await probe.query('SELECT 1')
      latencyMs = Math.round((now() - sent) * 100) / 100
    } finally {
      await probe.close()
    }
  })()
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new FST_REQUEST_DB_UNAVAILABLE(`no answer to SELECT 1 within ${timeoutMs}ms`)), timeoutMs)
  })
  try {
    await Promise.race([check, deadline])
    return { ok: true, latencyMs, pool: gate.stats() }
  } catch (err) {
    probe.abandon()
    // What the abandoned check still does ends on its own: its failure is reported above.
    check.catch(() => {})
    const { code, message } = err as { code?: string, message?: string }
    return { ok: false, latencyMs: null, pool: gate.stats(), error: { code, message: gate.redact(String(message ?? err)) } }
  } finally {
    clearTimeout(timer)
  }
}

/** The health check's session: one that can be given up on when its deadline passes. */
class Probe extends Session {
  abandoned = false

  /**
   * Past the deadline: a `SELECT 1` still running is cancelled and its connection closed, not
   * waited for (on a dead network it would hold a pool slot until the OS gives up on the socket).
   * A client still on its way goes straight back to the pool when it comes (`close()`).
   */
  abandon (): void {
    this.abandoned = true
    const client = this.current
    if (client === null) return
    this.current = null
    if (this.isBusy()) this.cancel(client, 'the health check ran out of time')
    void this.giveBack(client, true)
  }
}
