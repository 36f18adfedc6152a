// Overload: far more concurrent requests than clients. Every request ends, fast, with 200 or a
// 503 that says when to retry; a bounded wait queue sheds at once instead of growing latency.
import t from 'tap'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { get, listen } from './helpers/http.js'

/** `count` GETs at once, each on its own connection. */
async function storm (port: number, count: number): Promise<Array<{ status: number, retryAfter: unknown, ms: number }>> {
  const started = Date.now()
  return await Promise.all(Array.from({ length: count }, async () => {
    const res = await get(port, '/slow')
    return { status: res.status, retryAfter: res.headers['retry-after'], ms: Date.now() - started }
  }))
}

t.test('2,000 concurrent requests on a pool of 5: each ends with 200 or 503 + Retry-After, in bounded time', { timeout: 120_000 }, async (t) => {
  const db = await createDatabase(t)
  const acquireTimeoutMs = 1000
  const app = await buildApp(db, { max: 5, acquireTimeoutMs })
  app.get('/slow', async (request) => (await request.db.query('SELECT pg_sleep(0.02) AS ok')).rows[0])
  const port = await listen(app)
  const rssBefore = process.memoryUsage.rss()
  const results = await storm(port, 2000)
  const ok = results.filter((r) => r.status === 200)
  const shed = results.filter((r) => r.status === 503)
  t.equal(ok.length + shed.length, 2000, `every request ended: ${ok.length} × 200, ${shed.length} × 503`)
  t.ok(shed.every((r) => r.retryAfter === '1'), 'each 503 says Retry-After')
  t.ok(ok.length > 0, 'some were served')
  // Bound: one acquire timeout plus the statement, with slack for a busy 2-core machine.
  const slowest = Math.max(...results.map((r) => r.ms))
  t.ok(slowest < acquireTimeoutMs + 20 + 4000, `slowest ended after ${slowest} ms`)
  t.ok(process.memoryUsage.rss() - rssBefore < 512 * 1048576, 'memory stayed bounded')
  await waitFor(() => app.db.stats().leased === 0 && app.db.stats().waiting === 0, 5000, 'drain')
})

t.test('maxWaiting sheds load at once: latency does not grow with the queue', { timeout: 120_000 }, async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 5, maxWaiting: 20, acquireTimeoutMs: 5000 })
  app.get('/slow', async (request) => (await request.db.query('SELECT pg_sleep(0.05) AS ok')).rows[0])
  const port = await listen(app)
  const results = await storm(port, 1000)
  const shed = results.filter((r) => r.status === 503)
  const ok = results.filter((r) => r.status === 200)
  t.equal(ok.length + shed.length, 1000, `${ok.length} × 200, ${shed.length} × 503`)
  t.ok(shed.length > 500, 'most were shed')
  t.ok(shed.every((r) => r.retryAfter === '1'))
  // Those served waited behind at most maxWaiting others: 25 ahead at 50 ms per 5 clients ≈ 0.3 s.
  const slowestServed = Math.max(...ok.map((r) => r.ms))
  t.ok(slowestServed < 3000, `slowest served request: ${slowestServed} ms (queue bounded, not 1000 deep)`)
  await waitFor(() => app.db.stats().leased === 0, 5000, 'drain')
})
