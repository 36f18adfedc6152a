// leakDetectionMs: a request that holds its connection too long is reported once through its own
// logger, and again when it gives the connection back; off, a request keeps no books at all.
import t from 'tap'
import type { Lease } from '../lib/lease.js'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { captureLog, type LogLine } from './helpers/log.js'

const LEAK = 'fastify-request-db: a request has held its database connection'
const GAVE_BACK = 'fastify-request-db: the request reported for holding its database connection gave it back'

function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/** The reqId Fastify gave the request for `url`, read from its "incoming request" line. */
function reqIdOf (lines: LogLine[], url: string): string | undefined {
  return lines.find((l) => l.msg === 'incoming request' && (l.req as { url?: string } | undefined)?.url === url)?.reqId
}

t.test('a request holding its connection past leakDetectionMs: one warning with what it ran, one line when it gives it back', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { leakDetectionMs: 200 }, { logger: { level: 'info', stream: log.stream } })
  app.get('/orders/:id', async (request) => {
    await request.db.query('SELECT $1::text AS card  FROM\n  generate_series(1, 1)', ['4111-1111-1111-1111'])
    // Holds the connection while doing something else: the leak this is for.
    await sleep(700)
    return 'ok'
  })
  app.get('/fast', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  await app.ready()

  t.equal((await app.inject('/fast')).statusCode, 200)
  t.equal((await app.inject('/orders/42')).statusCode, 200)
  await waitFor(() => log.lines().some((l) => l.msg === GAVE_BACK), 3000, 'the release line')

  const lines = log.lines()
  const leaks = lines.filter((l) => l.msg.startsWith(LEAK))
  t.equal(leaks.length, 1, 'one warning, for the slow request only (not one per sweep)')
  const [leak] = leaks
  t.equal(leak.level, 40, 'warn')
  t.equal(leak.reqId, reqIdOf(lines, '/orders/42'), 'through the request\'s logger: its request id')
  t.equal(leak.method, 'GET')
  t.equal(leak.route, '/orders/:id', 'the route pattern, not the URL')
  t.ok((leak.heldMs as number) >= 200 && (leak.heldMs as number) < 700, `age when reported: ${String(leak.heldMs)} ms`)
  t.equal(leak.statementRunning, false, 'held idle, not by a slow statement')
  t.equal(leak.lastStatement, 'SELECT $1::text AS card FROM generate_series(1, 1)', 'the text on one line, no values')
  t.match(leak.msg, /over 200 ms \(leakDetectionMs\)/)

  const released = lines.filter((l) => l.msg === GAVE_BACK)
  t.equal(released.length, 1)
  t.equal(released[0].reqId, leak.reqId)
  t.equal(released[0].route, '/orders/:id')
  t.ok((released[0].heldMs as number) >= 700, `total age: ${String(released[0].heldMs)} ms`)
  t.notOk(log.text().includes('4111-1111'), 'no parameter value in any line')

  t.equal(app.db.stats().leaksDetected, 1, 'counted in stats()')
  t.equal(app.db.stats().leased, 0)
})

t.test('a slow statement: reported while it runs, its text cut to 200 characters', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { leakDetectionMs: 150 }, { logger: { level: 'warn', stream: log.stream } })
  const statement = `SELECT pg_sleep(0.6) AS slept /* ${'x'.repeat(300)} */`
  app.post('/report', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query(statement)
    return 'ok'
  })
  t.equal((await app.inject({ method: 'POST', url: '/report' })).statusCode, 200)
  await waitFor(() => log.lines().some((l) => l.msg === GAVE_BACK), 3000, 'the release line')
  const [leak] = log.lines().filter((l) => l.msg.startsWith(LEAK))
  t.equal(leak.statementRunning, true, 'a statement was running')
  t.equal(leak.method, 'POST')
  t.equal((leak.lastStatement as string).length, 201, '200 characters and an ellipsis')
  t.ok((leak.lastStatement as string).startsWith('SELECT pg_sleep(0.6) AS slept /* xxx'))
  t.ok((leak.lastStatement as string).endsWith('x…'))
  t.equal(app.db.stats().leaksDetected, 1)
})

t.test('each hold is reported once; requests held at the same time are each reported', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { leakDetectionMs: 100 }, { logger: { level: 'warn', stream: log.stream } })
  app.get('/hold', async (request) => {
    await request.db.query('SELECT 1')
    await sleep(450)
    return 'ok'
  })
  const answers = await Promise.all([app.inject('/hold'), app.inject('/hold'), app.inject('/hold')])
  t.same(answers.map((a) => a.statusCode), [200, 200, 200])
  await waitFor(() => log.lines().filter((l) => l.msg === GAVE_BACK).length === 3, 3000, 'three release lines')
  const leaks = log.lines().filter((l) => l.msg.startsWith(LEAK))
  t.equal(leaks.length, 3, 'three requests, three warnings, however many sweeps saw them')
  t.equal(new Set(leaks.map((l) => l.reqId)).size, 3, 'each with its own request id')
  t.equal(app.db.stats().leaksDetected, 3)
})

t.test('a request that hangs up while holding its connection: reported, then given back', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { leakDetectionMs: 100, abortGraceMs: 50 }, { logger: { level: 'warn', stream: log.stream } })
  app.get('/stuck', async (request) => {
    await request.db.query('SELECT pg_sleep(30)')
    return 'never'
  })
  const { getThenHangUp, listen } = await import('./helpers/http.js')
  const port = await listen(app)
  await getThenHangUp(port, '/stuck', 400)
  await waitFor(() => log.lines().some((l) => l.msg === GAVE_BACK), 5000, 'the release line')
  const leak = log.lines().find((l) => l.msg.startsWith(LEAK))
  t.equal(leak?.lastStatement, 'SELECT pg_sleep(30)')
  t.equal(leak?.statementRunning, true)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('off (the default): nothing reported, and a request keeps no books', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, {}, { logger: { level: 'warn', stream: log.stream } })
  let activity: unknown = 'not read'
  app.get('/hold', async (request) => {
    await request.db.query('SELECT 1')
    activity = (request.db as Lease).activity
    await sleep(300)
    return 'ok'
  })
  t.equal((await app.inject('/hold')).statusCode, 200)
  t.equal(activity, null, 'no LeaseActivity was made')
  t.equal(log.text(), '', 'nothing logged')
  t.equal(app.db.stats().leaksDetected, 0)
})
