// app.db.health() for readiness probes, and the documented @fastify/under-pressure setup
// (docs/observability.md) on the real package: 503 on /ready for a full wait queue or a dead database.
import underPressure from '@fastify/under-pressure'
import { type AddressInfo, connect, createServer, type Socket } from 'node:net'
import t from 'tap'
import { adminUrl, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { startProxy } from './helpers/proxy.js'

const password = decodeURIComponent(new URL(adminUrl).password)

function viaPort (db: TestDatabase, port: number): string {
  const url = new URL(db.url)
  url.host = `127.0.0.1:${port}`
  return url.toString()
}

/**
 * A proxy that can stop passing the server's bytes on (a network that drops packets): a statement
 * then never gets its answer, and nothing fails either.
 */
async function startFreezableProxy (target: URL): Promise<{ port: number, freeze (): void, close (): void }> {
  const sockets = new Set<Socket>()
  let frozen = false
  const server = createServer((client) => {
    const upstream = connect(Number(target.port || 5432), target.hostname)
    sockets.add(client).add(upstream)
    const drop = (): void => { client.destroy(); upstream.destroy() }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
    client.on('data', (chunk) => upstream.write(chunk))
    upstream.on('data', (chunk) => { if (!frozen) client.write(chunk) })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    port: (server.address() as AddressInfo).port,
    freeze () { frozen = true },
    close () {
      for (const s of sockets) s.destroy()
      server.close()
    }
  }
}

t.test('health(): ok, the SELECT 1 round trip and the pool figures; the client goes back', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  await app.ready()
  const health = await app.db.health()
  t.equal(health.ok, true)
  t.type(health.latencyMs, 'number')
  t.ok((health.latencyMs as number) >= 0 && (health.latencyMs as number) < 1000, `latency ${String(health.latencyMs)} ms`)
  t.same(health.pool, { total: 1, idle: 1, waiting: 0, leased: 0, leaksDetected: 0 })
  t.equal(health.error, undefined)
  t.same(app.db.stats(), { total: 1, idle: 1, waiting: 0, leased: 0, leaksDetected: 0 }, 'nothing held after it')
})

t.test('health() waiting for a client past its deadline: not ok, in time; the client it gets later goes back', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1 })
  app.get('/hold', async (request) => (await request.db.query('SELECT pg_sleep(0.6) AS slept')).rows[0])
  await app.ready()
  const holding = app.inject('/hold')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the request to hold the only client')
  const started = Date.now()
  const health = await app.db.health({ timeoutMs: 200 })
  const elapsed = Date.now() - started
  t.equal(health.ok, false)
  t.equal(health.latencyMs, null)
  t.same(health.error, { code: 'FST_REQUEST_DB_UNAVAILABLE', message: 'The database is unavailable: no answer to SELECT 1 within 200ms' })
  t.ok(elapsed >= 190 && elapsed < 600, `answered after ${elapsed} ms`)
  t.equal((await holding).statusCode, 200)
  // The probe's checkout was still queued: it gets the client after the request, and gives it back.
  await waitFor(() => app.db.stats().idle === 1 && app.db.stats().waiting === 0, 3000, 'the client back in the pool')
  t.equal(app.db.stats().total, 1, 'kept: nothing was wrong with it')
  t.equal((await app.db.health()).ok, true)
})

t.test('health() on a connection that stops answering: not ok at the deadline; that connection is closed', async (t) => {
  const db = await createDatabase(t)
  const proxy = await startFreezableProxy(new URL(adminUrl))
  t.teardown(() => proxy.close())
  const app = await buildApp(db, { connectionString: viaPort(db, proxy.port) })
  await app.ready()
  t.equal(app.db.stats().idle, 1, 'the startup check left one idle client')
  proxy.freeze()
  const started = Date.now()
  const health = await app.db.health({ timeoutMs: 300 })
  t.ok(Date.now() - started < 1000, 'answered at its deadline')
  t.equal(health.ok, false)
  t.equal(health.error?.code, 'FST_REQUEST_DB_UNAVAILABLE')
  await waitFor(() => app.db.stats().total === 0, 3000, 'the silent connection to be closed, not kept')
})

t.test('health() with the database gone: not ok, with a code and no password; ok again once it is back', async (t) => {
  const db = await createDatabase(t)
  const target = new URL(adminUrl)
  const proxy = await startProxy({ host: target.hostname, port: Number(target.port || 5432) })
  t.teardown(() => proxy.close())
  const app = await buildApp(db, { connectionString: viaPort(db, proxy.port), acquireTimeoutMs: 1000 })
  await app.ready()
  await proxy.cut()
  await waitFor(() => app.db.stats().total === 0, 3000, 'the pool to see its idle client die')
  const down = await app.db.health()
  t.equal(down.ok, false)
  t.equal(down.latencyMs, null)
  t.equal(down.error?.code, 'FST_REQUEST_DB_UNAVAILABLE')
  t.match(down.error?.message, /ECONNREFUSED/)
  if (password !== '') t.notOk(JSON.stringify(down).includes(password), 'no password')
  await proxy.restore()
  t.equal((await app.db.health()).ok, true)
})

t.test('health() once close() has begun: not ok, FST_REQUEST_DB_CLOSING', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  app.get('/hold', async (request) => (await request.db.query('SELECT pg_sleep(0.4) AS slept')).rows[0])
  await app.ready()
  const holding = app.inject('/hold')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the request to hold a client')
  const closing = app.close()
  const health = await app.db.health()
  t.equal(health.ok, false)
  t.equal(health.error?.code, 'FST_REQUEST_DB_CLOSING')
  await holding
  await closing
})

t.test('@fastify/under-pressure: /ready answers 503 while the wait queue is full, or the database is gone', async (t) => {
  const db = await createDatabase(t)
  const target = new URL(adminUrl)
  const proxy = await startProxy({ host: target.hostname, port: Number(target.port || 5432) })
  t.teardown(() => proxy.close())
  const app = await buildApp(db, { connectionString: viaPort(db, proxy.port), max: 1, acquireTimeoutMs: 2000 })
  // As in docs/observability.md: not ready while this many requests wait for a connection, or
  // while the database does not answer.
  const MAX_WAITING = 2
  await app.register(underPressure, {
    healthCheck: async (app) => app.db.stats().waiting < MAX_WAITING && (await app.db.health({ timeoutMs: 1000 })).ok,
    exposeStatusRoute: '/ready'
  })
  app.get('/slow', async (request) => (await request.db.query('SELECT pg_sleep(0.5) AS slept')).rows[0])
  await app.ready()

  const ready = await app.inject('/ready')
  t.equal(ready.statusCode, 200)
  t.same(ready.json(), { status: 'ok' })

  const slow = [app.inject('/slow'), app.inject('/slow'), app.inject('/slow')]
  await waitFor(() => app.db.stats().waiting >= MAX_WAITING, 3000, 'requests waiting for the one client')
  const busy = await app.inject('/ready')
  t.equal(busy.statusCode, 503, 'the wait queue is full')
  t.equal(busy.json().code, 'FST_UNDER_PRESSURE')
  t.ok(busy.headers['retry-after'])
  t.same((await Promise.all(slow)).map((r) => r.statusCode), [200, 200, 200], 'the requests themselves were served')
  t.equal((await app.inject('/ready')).statusCode, 200, 'ready again')

  await proxy.cut()
  t.equal((await app.inject('/ready')).statusCode, 503, 'the database is gone')
  await proxy.restore()
  t.equal((await app.inject('/ready')).statusCode, 200, 'and back')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})
