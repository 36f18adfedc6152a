import type { FastifyRequest } from 'fastify'
import { now } from '../clock.js'
import type { LeakDetector } from './leak-detector.js'

/** A statement as the lease saw it: text, a QueryConfig, or a stream (submittable). */
export type StatementText = string | { text?: string, cursor?: { text?: string } }

/** The figures of `db` on the completion line and in `Server-Timing`. */
export interface DbTime {
  /** Statements the request ran (its route transaction's BEGIN and COMMIT included). */
  queries: number
  /** Time they ran, in ms. A connection runs one statement at a time: this is its busy time. */
  ms: number
  /** Time spent waiting for a connection from the pool, in ms. */
  waitMs: number
}

/**
 * One request's books for leak detection and request timing: when its connection was taken, the
 * last statement's text, how many statements ran and for how long, and the wait for a connection.
 * Made at a request's first checkout, and only when one of those features is on: with both off a
 * lease keeps no books at all (Lease.activity stays null).
 */
export class LeaseActivity {
  queries = 0
  /** Since the connection was taken (performance.now()); 0 while none is held. */
  heldSince = 0
  /** The last statement sent: kept as given, turned into text only when it is logged. */
  lastStatement: StatementText | null = null
  /** The leak warning was logged for this hold: the release gets its own line. */
  reported = false
  readonly request: FastifyRequest
  private readonly leaks: LeakDetector | null
  private busyMs = 0
  private inFlight = 0
  private busySince = 0
  private waitMs = 0
  private waitSince = 0

  constructor (request: FastifyRequest, leaks: LeakDetector | null) {
    this.request = request
    this.leaks = leaks
  }

  /** Is a statement of the request running (or queued on its connection) right now? */
  get running (): boolean {
    return this.inFlight > 0
  }

  waitStarted (): void {
    this.waitSince = now()
  }

  /** The wait for a connection is over: `gotOne` when the pool handed one over. */
  waitEnded (gotOne: boolean): void {
    const at = now()
    this.waitMs += at - this.waitSince
    this.waitSince = 0
    // A lease that lost its connection and takes a new one is still the same hold: its age runs on.
    if (gotOne && this.heldSince === 0) this.heldSince = at
  }

  statementStarted (statement: StatementText): void {
    this.queries++
    this.lastStatement = statement
    // pg runs a connection's statements one after another (the rest wait in its queue): the time
    // with at least one in flight is the sum of their run times, without counting a queued
    // statement's wait twice.
    if (this.inFlight++ === 0) this.busySince = now()
  }

  statementEnded (): void {
    if (--this.inFlight === 0) this.busyMs += now() - this.busySince
  }

  /** The sweep (every 100 ms while a connection is held): has this hold gone on too long? */
  sweep (): void {
    if (this.leaks !== null && !this.reported && this.heldSince !== 0) this.leaks.check(this)
  }

  /** The lease gave its connection back to the pool. */
  released (): void {
    if (this.reported) this.leaks?.released(this)
    this.reported = false
    this.heldSince = 0
  }

  /** The figures so far; a statement or a wait still going counts up to now. */
  time (): DbTime {
    const at = now()
    return {
      queries: this.queries,
      ms: round(this.busyMs + (this.inFlight > 0 ? at - this.busySince : 0)),
      waitMs: round(this.waitMs + (this.waitSince !== 0 ? at - this.waitSince : 0))
    }
  }
}

/** What a request that never took a connection reports. */
export const NO_DB_TIME: Readonly<DbTime> = Object.freeze({ queries: 0, ms: 0, waitMs: 0 })

/** Hundredths of a millisecond: enough to tell a 0.1 ms statement from none, short in a log line. */
function round (ms: number): number {
  return Math.round(ms * 100) / 100
}
