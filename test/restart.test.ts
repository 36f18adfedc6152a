// PostgreSQL restarted (stop, wait, start) while requests are in flight. Uses a server of its own,
// since the run's shared server must stay up for the other files.
import Fastify from 'fastify'
import t from 'tap'
import requestDb from '../lib/index.js'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'
import { waitFor } from './helpers/db.js'

t.test('restart under load: in-flight requests get 5xx in bounded time; service resumes; no broken client reused', { timeout: 90_000 }, async (t) => {
  const server = await startEmbeddedPostgres()
  t.teardown(() => server.stop())
  const acquireTimeoutMs = 1000
  const app = Fastify({ logger: false })
  t.teardown(() => app.close())
  await app.register(requestDb, { connectionString: server.url, max: 4, acquireTimeoutMs })
  app.get('/slow', async (request) => (await request.db.query('SELECT pg_sleep(0.5) AS slept, pg_backend_pid() AS pid')).rows[0])
  app.get('/pid', async (request) => (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0])
  await app.ready()
  // Warm the pool: four connections that the restart will kill.
  await Promise.all(Array.from({ length: 4 }, () => app.inject('/slow')))
  const before = new Set((await Promise.all(Array.from({ length: 4 }, () => app.inject('/pid')))).map((r) => r.json().pid))

  const started = Date.now()
  const inFlight = Array.from({ length: 8 }, () => app.inject('/slow').then((r) => ({ status: r.statusCode, code: r.json().code, ms: Date.now() - started })))
  await new Promise((resolve) => setTimeout(resolve, 100))
  await server.stopServer()
  const results = await Promise.all(inFlight)
  for (const r of results) {
    t.ok(r.status === 200 || r.status >= 500, `status ${r.status} ${r.code ?? ''}`)
    t.ok(r.ms < 500 + acquireTimeoutMs + 2000, `ended in ${r.ms} ms, not hanging`)
  }
  t.ok(results.some((r) => r.status === 503), 'requests cut by the restart answered 503')

  const down = await app.inject('/pid')
  t.equal(down.statusCode, 503, 'while the server is down: 503')
  t.equal(down.json().code, 'FST_REQUEST_DB_UNAVAILABLE')

  await server.startServer()
  const upAt = Date.now()
  await waitFor(async () => (await app.inject('/pid')).statusCode === 200, 10_000, 'the first success after the restart')
  t.pass(`serving again ${Date.now() - upAt} ms after the server came back, same app`)
  const after = await Promise.all(Array.from({ length: 20 }, () => app.inject('/pid')))
  t.same(after.map((r) => r.statusCode), Array(20).fill(200), 'no request after recovery got a dead client')
  t.notOk(after.some((r) => before.has(r.json().pid)), 'no connection from before the restart was handed out again')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})
