// HTTP clients that hang up while their request's statement sleeps on the server, one after another,
// and what became of each statement, lease and row; and requestCancel timed on its own. Shared by the
// direct and PgBouncer cancel tests.
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { requestCancel } from '../../lib/cancel.js'
import { appBackends, type TestDatabase, waitFor } from './db.js'
import { get, getOnOwnSocket, listen } from './http.js'

/** Enough tries for a race between the cancel and its connection's close to show. */
export const TRIES = 20
/** The bound: hang-up to statement gone from the server's pg_stat_activity. */
export const GONE_WITHIN_MS = 2000
/** Short, so that each try takes about half a second (the default is 250). */
export const ABORT_GRACE_MS = 20

/**
 * Routes on `app`: `/sleep` (a plain route) and `/sleep-tx?id=N` (a route transaction that inserts
 * row N before sleeping), both in `pg_sleep(10)`, and `/quick`.
 */
export async function addRoutes (app: FastifyInstance, db: TestDatabase): Promise<void> {
  await db.admin.query('CREATE TABLE IF NOT EXISTS hang_up_rows (id int PRIMARY KEY)')
  app.get('/sleep', async (request) => {
    await request.db.query('SELECT pg_sleep(10)')
    return 'finished'
  })
  app.get('/sleep-tx', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO hang_up_rows (id) VALUES ($1)', [Number((request.query as { id: string }).id)])
    await request.db.query('SELECT pg_sleep(10)')
    return 'finished'
  })
  app.get('/quick', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
}

export interface HangUps {
  tries: number
  /** Hang-up to statement gone, ms, for the tries whose statement went within GONE_WITHIN_MS. */
  latencies: number[]
  /** Tries whose statement still ran GONE_WITHIN_MS after the hang-up (then cancelled by the test). */
  leftRunning: number[]
  /** Tries after which `app.db.stats().leased` did not come back to 0 within 3 s. */
  leaseKept: number[]
  /** Tries whose inserted row is in the table (the route transaction committed). */
  committed: number[]
  /** Tries after which `/quick` did not answer 200, with what it answered. */
  notServed: string[]
  /** Tries after which `stillUp` failed, with its error (PgBouncer crashed, say). */
  down: string[]
}

/**
 * `tries` times: a client on a real socket asks `path`, waits until its statement runs on the
 * server, hangs up; then what became of it. `stillUp` is checked after each try; if it throws, the
 * failure is counted and `recover` (a PgBouncer restart) lets the remaining tries run.
 */
export async function hangUpRepeatedly (app: FastifyInstance, db: TestDatabase, path: '/sleep' | '/sleep-tx', opts: {
  tries?: number
  firstId?: number
  stillUp?: () => Promise<void>
  recover?: () => Promise<void>
} = {}): Promise<HangUps> {
  const { tries = TRIES, firstId = 0 } = opts
  const port = await listen(app)
  const result: HangUps = { tries, latencies: [], leftRunning: [], leaseKept: [], committed: [], notServed: [], down: [] }
  for (let i = 0; i < tries; i++) {
    const id = firstId + i
    const socket = getOnOwnSocket(port, `${path}?id=${id}`)
    const sleeping = await waitFor(async () => (await appBackends(db)).find((b) => b.state === 'active' && b.query.includes('pg_sleep')), 5000, `try ${i}: the statement to start`) as { pid: number }
    const hungUpAt = Date.now()
    socket.destroy()
    const gone = await waitFor(async () => !(await appBackends(db)).some((b) => b.pid === sleeping.pid && b.state === 'active' && b.query.includes('pg_sleep')), GONE_WITHIN_MS, 'cancel').then(() => true, () => false)
    if (gone) {
      result.latencies.push(Date.now() - hungUpAt)
    } else {
      result.leftRunning.push(i)
      await cancelLeftovers(db)
    }
    if (!await waitFor(() => app.db.stats().leased === 0, 3000, 'release').then(() => true, () => false)) result.leaseKept.push(i)
    if (opts.stillUp !== undefined) {
      try {
        await opts.stillUp()
      } catch (err) {
        result.down.push(`try ${i}: ${(err as Error).message}`)
        await opts.recover?.()
      }
    }
    const next = await get(port, '/quick').then((r) => r.status === 200 ? null : `status ${r.status} ${r.body}`, (err: Error) => err.message)
    if (next !== null) result.notServed.push(`try ${i}: ${next}`)
    if (path === '/sleep-tx') {
      const { rows } = await db.admin.query('SELECT 1 FROM hang_up_rows WHERE id = $1', [id])
      if (rows.length > 0) result.committed.push(i)
    }
  }
  return result
}

type Asserts = {
  equal (found: unknown, wanted: unknown, message: string): unknown
  same (found: unknown, wanted: unknown, message: string): unknown
  pass (message: string): unknown
}

/** min / median / max of `ms`, for the test's output. */
export function spread (ms: number[]): string {
  if (ms.length === 0) return 'none'
  const sorted = [...ms].sort((a, b) => a - b)
  return `min ${sorted[0]} ms, median ${sorted[Math.floor(sorted.length / 2)]} ms, max ${sorted[sorted.length - 1]} ms (n = ${sorted.length})`
}

/** The tap assertions on a run of `hangUpRepeatedly`, and its latencies as a passing line. */
export function assertHangUps (t: Asserts, run: HangUps, what: string): void {
  t.equal(run.latencies.length, run.tries, `${what}: every statement left pg_stat_activity within ${GONE_WITHIN_MS} ms of the hang-up`)
  t.same(run.leftRunning, [], `${what}: no statement left running`)
  t.same(run.leaseKept, [], `${what}: every lease given back`)
  t.same(run.down, [], `${what}: still up after every hang-up`)
  t.same(run.notServed, [], `${what}: the next request served after every hang-up`)
  t.same(run.committed, [], `${what}: no row committed`)
  t.pass(`${what}: hang-up → statement gone from pg_stat_activity: ${spread(run.latencies)} (abortGraceMs ${ABORT_GRACE_MS}, hang-ups noticed within 100 ms)`)
}

export interface CancelRoundTrips {
  /** requestCancel sent → the statement's own error ("canceling statement due to user request"). */
  toError: number[]
  /** requestCancel sent → its promise resolved: the server closed the cancel connection. */
  toClose: number[]
  /** What the statement ended with when that was not a cancel (or it did not end within 2 s). */
  failures: string[]
}

/**
 * requestCancel on its own, without the plugin: `tries` times, a fresh pg.Client (`config`) runs
 * pg_sleep(10); once it runs on the server (seen in `db`), the cancel is sent.
 */
export async function cancelRoundTrips (config: pg.ClientConfig, db: TestDatabase, tries = TRIES): Promise<CancelRoundTrips> {
  const result: CancelRoundTrips = { toError: [], toClose: [], failures: [] }
  for (let i = 0; i < tries; i++) {
    const client = new pg.Client(config)
    client.on('error', () => {})
    await client.connect()
    try {
      let endedAt = 0
      const outcome = client.query('SELECT pg_sleep(10)').then(() => 'finished', (err: Error) => err.message)
        .finally(() => { endedAt = Date.now() })
      await waitFor(async () => (await appBackends(db)).some((b) => b.state === 'active' && b.query.includes('pg_sleep')), 5000, 'the statement to start')
      const sentAt = Date.now()
      const closed = requestCancel(client as never).then(() => Date.now() - sentAt)
      const ended = await Promise.race([outcome, new Promise<string>((resolve) => setTimeout(resolve, 2000, 'still running after 2 s'))])
      if (/canceling statement due to user request/.test(ended)) result.toError.push(endedAt - sentAt)
      else {
        result.failures.push(`try ${i}: ${ended}`)
        await cancelLeftovers(db)
      }
      result.toClose.push(await closed)
    } finally {
      await client.end().catch(() => {})
    }
  }
  return result
}

/** Not the code under test's doing: a statement it left running is cancelled so the next try starts clean. */
async function cancelLeftovers (db: TestDatabase): Promise<void> {
  await db.admin.query(`SELECT pg_cancel_backend(pid) FROM pg_stat_activity
    WHERE datname = $1 AND state = 'active' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()`, [db.name])
}
