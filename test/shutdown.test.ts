// app.close(): no new connections from preClose on, held clients waited for (up to
// shutdownTimeoutMs), then cancelled; the pool ended; nothing of the app left on the server.
import t from 'tap'
import { appBackends, buildApp, createDatabase, waitFor } from './helpers/db.js'
import { get, listen } from './helpers/http.js'

t.test('close() waits for a request that holds a client, then ends the pool: no backend left', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  app.get('/work', async (request) => {
    await request.db.query('SELECT pg_sleep(0.5)')
    return 'done'
  })
  const port = await listen(app)
  const inFlight = get(port, '/work')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the request to hold a client')
  await app.close()
  t.equal((await inFlight).status, 200, 'the request in flight finished normally')
  t.same(app.db.stats(), { total: 0, idle: 0, waiting: 0, leased: 0, leaksDetected: 0 })
  t.equal((await appBackends(db)).length, 0, 'the database shows no backend of the app')
})

t.test('past shutdownTimeoutMs, running statements are cancelled; close() returns within the bound', async (t) => {
  const db = await createDatabase(t)
  const shutdownTimeoutMs = 400
  const app = await buildApp(db, { shutdownTimeoutMs })
  app.get('/stuck', async (request) => {
    await request.db.query('SELECT pg_sleep(60)')
    return 'never'
  })
  const port = await listen(app)
  const inFlight = get(port, '/stuck').then((r) => r.status, () => 0)
  await waitFor(async () => (await appBackends(db)).some((b) => b.query.includes('pg_sleep(60)') && b.state === 'active'), 3000, 'the statement')
  const started = Date.now()
  await app.close()
  const took = Date.now() - started
  t.ok(took >= shutdownTimeoutMs - 50, `waited for the lease first (${took}ms)`)
  t.ok(took < shutdownTimeoutMs + 2000, `returned within shutdownTimeoutMs + 2s (${took}ms)`)
  const status = await inFlight
  t.ok(status >= 500 || status === 0, `the stuck request ended with an error (${status})`)
  await waitFor(async () => (await appBackends(db)).length === 0, 2000, 'no backend left')
  t.equal((await appBackends(db)).length, 0)
})

t.test('close() with a client held by a request that never finishes its statement on its own (inject)', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { shutdownTimeoutMs: 200 })
  app.get('/stuck', async (request) => {
    await request.db.query('SELECT pg_sleep(60)')
    return 'never'
  })
  await app.ready()
  const inFlight = app.inject('/stuck')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'lease')
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 2200, 'close() returned in time')
  t.equal((await inFlight).statusCode, 503, 'the cancelled statement surfaces as 503')
  await waitFor(async () => (await appBackends(db)).length === 0, 2000, 'no backend left')
})

t.test('close() with a statement still running after its response was sent (fire and forget)', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { shutdownTimeoutMs: 200 })
  let background: string | null = null
  app.get('/forget', async (request) => {
    await request.db.query('SELECT 1')
    // Not awaited: the response goes out while this runs, so the release waits for it.
    request.db.query('SELECT pg_sleep(60)').then(() => { background = 'finished' }, (err: { code?: string }) => { background = err.code ?? 'error' })
    return 'sent'
  })
  const port = await listen(app)
  t.equal((await get(port, '/forget')).status, 200)
  await waitFor(async () => (await appBackends(db)).some((b) => b.query.includes('pg_sleep(60)') && b.state === 'active'), 3000, 'the statement')
  t.equal(app.db.stats().leased, 1, 'the client is held until the statement ends')
  const started = Date.now()
  await app.close()
  // Before the release could be forced during that wait, close() waited for the 60 s statement.
  t.ok(Date.now() - started < 5000, `close() returned in time (${Date.now() - started}ms)`)
  t.equal(background, 'FST_REQUEST_DB_CLOSING', 'the statement was cancelled by the shutdown')
  await waitFor(async () => (await appBackends(db)).length === 0, 2000, 'no backend left')
})

t.test('close() reaches a request whose connection died while it held it (inside a transaction)', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { shutdownTimeoutMs: 100 })
  let letHandlerGoOn!: () => void
  const handlerMayGoOn = new Promise<void>((resolve) => { letHandlerGoOn = resolve })
  app.get('/tx', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('SELECT 1')
    await handlerMayGoOn
    await request.db.query('SELECT 2')
    return 'never'
  })
  await app.ready()
  const inFlight = app.inject('/tx')
  const backend = await waitFor(async () => (await appBackends(db)).find((b) => b.state === 'idle in transaction'), 3000, 'the transaction')
  await db.admin.query('SELECT pg_terminate_backend($1)', [backend?.pid])
  // The request keeps its dead connection (its transaction is lost, so its next query must fail),
  // and its handler is still busy: only the shutdown's forced release can give the client back.
  await waitFor(async () => (await appBackends(db)).length === 0, 3000, 'the backend to go')
  t.equal(app.db.stats().leased, 1, 'still held by the request')
  const closing = app.close()
  await waitFor(() => app.db.stats().leased === 0, 3000, 'the forced release to reach it')
  letHandlerGoOn()
  const res = await inFlight
  t.equal(res.statusCode, 503, 'its next query failed')
  t.equal(JSON.parse(res.body).code, 'FST_REQUEST_DB_CLOSING', 'with the shutdown\'s error, not "used after the request ended"')
  await closing
  t.same(app.db.stats(), { total: 0, idle: 0, waiting: 0, leased: 0, leaksDetected: 0 })
})
