import { now } from '../clock.js'
import type { LeaseActivity, StatementText } from './lease-activity.js'

// Enough of a statement to recognise it in a log line; the rest is left out.
const STATEMENT_CHARS = 200

/**
 * Leak detection (`leakDetectionMs`): a request holding its connection longer than the threshold
 * logs one warning through its own logger, and one more line when it finally gives it back.
 * Checked from the gate's sweep, which already runs every 100 ms while anything is held: no timer
 * per request. Only requests are watched: `app.db` work (a migration, a job) may hold a connection
 * for as long as it needs.
 */
export class LeakDetector {
  /** Leases reported so far (`app.db.stats().leaksDetected`). */
  detected = 0
  private readonly thresholdMs: number
  private readonly redact: (text: string) => string

  constructor (thresholdMs: number, redact: (text: string) => string) {
    this.thresholdMs = thresholdMs
    this.redact = redact
  }

  check (activity: LeaseActivity): void {
    const heldMs = now() - activity.heldSince
    if (heldMs < this.thresholdMs) return
    activity.reported = true
    this.detected++
    const request = activity.request
    request.log.warn({
      method: request.method,
      // The route's pattern (/users/:id), not the URL: it names the code, and carries no ids.
      route: request.routeOptions.url,
      heldMs: Math.round(heldMs),
      statementRunning: activity.running,
      lastStatement: this.describe(activity.lastStatement)
    }, `fastify-request-db: a request has held its database connection for over ${this.thresholdMs} ms (leakDetectionMs)`)
  }

  released (activity: LeaseActivity): void {
    const request = activity.request
    request.log.warn({
      method: request.method,
      route: request.routeOptions.url,
      heldMs: Math.round(now() - activity.heldSince)
    }, 'fastify-request-db: the request reported for holding its database connection gave it back')
  }

  /** The statement's text only (never its values), on one line, cut short, secrets masked. */
  private describe (statement: StatementText | null): string | null {
    if (statement === null) return null
    const text = typeof statement === 'string' ? statement : statement.text ?? statement.cursor?.text ?? '(a stream)'
    // Cut before masking too: a statement may carry megabytes of inline data.
    const line = this.redact(text.slice(0, STATEMENT_CHARS * 10).replace(/\s+/g, ' ').trim())
    return line.length > STATEMENT_CHARS ? `${line.slice(0, STATEMENT_CHARS)}…` : line
  }
}
