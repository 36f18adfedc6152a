// Requests that end badly over real sockets: the client hangs up, handlerTimeout or
// connectionTimeout fires, the body trickles in. Uses app.listen and node:http, not inject.
import { request as httpRequest } from 'node:http'
import t from 'tap'
import { appBackends, buildApp, countingPool, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { get, getOnOwnSocket, getThenHangUp, listen, postJson } from './helpers/http.js'

async function sleepingQueries (db: TestDatabase): Promise<number> {
  return (await appBackends(db)).filter((b) => b.state === 'active' && b.query.includes('pg_sleep')).length
}

t.test('client disconnects mid-query: the query is cancelled on the server and the client released', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  let handlerError: unknown = null
  app.get('/slow', async (request) => {
    try {
      await request.db.query('SELECT pg_sleep(30)')
    } catch (err) {
      handlerError = err
      throw err
    }
    return 'finished'
  })
  const port = await listen(app)
  const hungUp = getThenHangUp(port, '/slow', 60_000)
  await waitFor(() => sleepingQueries(db), 5000, 'the query to start')
  const started = Date.now()
  // Hang up now that the statement runs: the server side sees its socket close.
  app.server.closeAllConnections()
  await hungUp
  await waitFor(async () => (await sleepingQueries(db)) === 0, 3000, 'the statement to leave pg_stat_activity')
  t.ok(Date.now() - started < 2000, `cancelled within about a second (${Date.now() - started}ms)`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  t.match(String((handlerError as Error)?.message), /cancel/i, 'the handler saw its statement cancelled')
  t.equal(app.db.stats().leased, 0)
  t.equal((await get(port, '/health-unknown')).status, 404, 'the server keeps serving')
})

t.test('client hang-up via its own socket while the statement runs', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 2 })
  app.get('/slow', async (request) => {
    await request.db.query('SELECT pg_sleep(30)')
    return 'finished'
  })
  app.get('/quick', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  const port = await listen(app)
  const socket = getOnOwnSocket(port, '/slow')
  await waitFor(() => sleepingQueries(db), 5000, 'the query to start')
  const cancelledPid = (await appBackends(db)).find((b) => b.query.includes('pg_sleep'))?.pid
  t.equal(app.db.stats().leased, 1)
  const started = Date.now()
  socket.destroy()
  await waitFor(async () => (await sleepingQueries(db)) === 0, 3000, 'the statement to be cancelled')
  t.ok(Date.now() - started < 2000, `gone from pg_stat_activity in ${Date.now() - started}ms`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  for (let i = 0; i < 5; i++) t.equal((await get(port, '/quick')).status, 200, `request ${i} afterwards`)
  // A cancel is delivered whenever it arrives: the connection that was sent one must not be reused.
  const pids = new Set((await appBackends(db)).map((b) => b.pid))
  t.ok(cancelledPid !== undefined && !pids.has(cancelledPid), 'the cancelled connection was closed, not returned to the pool')
})

t.test('a hang-up during a statement that ends within moments: no cancel, the connection is kept', async (t) => {
  const db = await createDatabase(t)
  const { pool, counts } = countingPool(db.url, 2)
  db.closeFirst.push(() => pool.end())
  // A grace far longer than this test needs, so a loaded machine can't turn it into a cancel.
  const app = await buildApp(db, { pool, env: {}, abortGraceMs: 5000 })
  // The statement waits on a lock the test holds: it is surely running when the client hangs up,
  // and it ends when the test says so, not after some sleep.
  const locker = await db.admin.connect()
  t.teardown(() => locker.release())
  await locker.query('SELECT pg_advisory_lock(4711)')
  let serverSawHangUp!: () => void
  const hangUpSeen = new Promise<void>((resolve) => { serverSawHangUp = resolve })
  let handlerSaw: string | null = null
  app.get('/brief', async (request, reply) => {
    reply.raw.on('close', () => serverSawHangUp())
    await request.db.query('SELECT pg_advisory_xact_lock(4711)').then(() => { handlerSaw = 'finished' }, (err: Error) => { handlerSaw = err.message })
    return 'done'
  })
  app.get('/pid', async (request) => (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0])
  const port = await listen(app)
  const pidBefore = JSON.parse((await get(port, '/pid')).body).pid
  const base = { ...counts }
  const socket = getOnOwnSocket(port, '/brief')
  await waitFor(async () => (await appBackends(db)).some((b) => b.state === 'active' && b.query.includes('pg_advisory_xact_lock')), 5000, 'the statement to wait on the lock')
  t.equal(app.db.stats().leased, 1, 'the request holds its client when the client hangs up')
  socket.destroy()
  await hangUpSeen
  // Long enough for a cancel sent at the hang-up to land (a cancel is one new connection), well
  // within abortGraceMs.
  await new Promise((resolve) => setTimeout(resolve, 100))
  await locker.query('SELECT pg_advisory_unlock(4711)')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  t.equal(handlerSaw, 'finished', 'the statement was left to finish, not cancelled')
  t.equal(counts.released - base.released, 1, 'released once')
  t.equal(counts.destroyed - base.destroyed, 0, 'its connection went back to the pool, not closed')
  t.equal(JSON.parse((await get(port, '/pid')).body).pid, pidBefore, 'the next request uses the same connection')
})

t.test('handlerTimeout: 503 for the client, the statement cancelled, the client released', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, {}, { handlerTimeout: 300 })
  app.get('/slow', async (request) => {
    await request.db.query('SELECT pg_sleep(30)')
    return 'finished'
  })
  const port = await listen(app)
  const started = Date.now()
  const res = await get(port, '/slow')
  t.equal(res.status, 503)
  await waitFor(async () => (await sleepingQueries(db)) === 0, 3000, 'cancel')
  t.ok(Date.now() - started < 2500, `cancelled in ${Date.now() - started}ms`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('handlerTimeout configured, request with a body: its read-to-the-end is not taken for a timeout', async (t) => {
  // Fastify aborts request.signal when the request stream closes, which for a body is right after
  // it was read: only the timeout's own error may cancel statements (found by the example's test).
  const db = await createDatabase(t)
  const app = await buildApp(db, {}, { handlerTimeout: 5000 })
  app.post('/write', { config: { db: { transaction: true } } }, async (request) => {
    const first = await request.db.query<{ n: number }>('SELECT $1::int AS n', [(request.body as { n: number }).n])
    await new Promise((resolve) => setTimeout(resolve, 20))
    const second = await request.db.query<{ n: number }>('SELECT $1::int + 1 AS n', [first.rows[0].n])
    return { n: second.rows[0].n }
  })
  const port = await listen(app)
  for (let i = 0; i < 5; i++) {
    const res = await postJson(port, '/write', { n: i })
    t.same([res.status, JSON.parse(res.body)], [200, { n: i + 1 }], `request ${i}: answered, nothing cancelled`)
  }
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('connectionTimeout: the socket is closed under the request; the statement is cancelled', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, {}, { connectionTimeout: 400 })
  app.get('/slow', async (request) => {
    await request.db.query('SELECT pg_sleep(30)')
    return 'finished'
  })
  const port = await listen(app)
  const outcome = await get(port, '/slow').then((r) => `status ${r.status}`, (e: Error) => e.message)
  t.match(outcome, /socket hang up|ECONNRESET|status 5/, `the client sees the connection end (${outcome})`)
  await waitFor(async () => (await sleepingQueries(db)) === 0, 3000, 'cancel')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('a client that hangs up while its request waits for a pool client', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1 })
  app.get('/hold', async (request) => {
    await request.db.query('SELECT pg_sleep(0.6)')
    return 'held'
  })
  app.get('/wait', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  const port = await listen(app)
  const holder = get(port, '/hold')
  await waitFor(() => sleepingQueries(db), 5000, 'the holder to start')
  await getThenHangUp(port, '/wait', 150)
  t.equal((await holder).body, 'held')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'the waiter gave the client straight back')
  t.equal((await get(port, '/wait')).status, 200)
})

t.test('a slowly trickled request body holds no pool client', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { idleTimeoutMs: 0 })
  app.post('/echo', async (request) => {
    const { rows } = await request.db.query<{ n: number }>('SELECT length($1::text) AS n', [JSON.stringify(request.body)])
    return rows[0]
  })
  const port = await listen(app)
  const before = app.db.stats()
  const body = JSON.stringify({ text: 'x'.repeat(50) })
  const result = new Promise<{ status: number, body: string }>((resolve, reject) => {
    const req = httpRequest({ port, host: '127.0.0.1', path: '/echo', method: 'POST', agent: false, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      let text = ''
      res.on('data', (c) => { text += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }))
    })
    req.on('error', reject)
    let i = 0
    const timer = setInterval(() => {
      req.write(body.slice(i, i + 10))
      i += 10
      if (i >= body.length) { clearInterval(timer); req.end() }
    }, 100)
  })
  // Sample while the body is still arriving.
  const samples: number[] = []
  for (let i = 0; i < 5; i++) {
    await new Promise((resolve) => setTimeout(resolve, 80))
    samples.push(app.db.stats().leased + app.db.stats().total - before.total)
  }
  t.same(samples, [0, 0, 0, 0, 0], 'no client taken while the body trickles in')
  const res = await result
  t.equal(res.status, 200)
  t.same(JSON.parse(res.body), { n: body.length })
})

t.test('exactly once over real sockets: hang-up, handlerTimeout and connectionTimeout each release one checkout once', async (t) => {
  const db = await createDatabase(t)
  const { pool, counts } = countingPool(db.url)
  db.closeFirst.push(() => pool.end())
  const app = await buildApp(db, { pool, env: {} }, { connectionTimeout: 700 })
  const slow = async (request: { db: { query: (sql: string) => Promise<unknown> } }): Promise<string> => {
    await request.db.query('SELECT pg_sleep(30)')
    return 'finished'
  }
  app.get('/hang-up', slow)
  app.get('/handler-timeout', { handlerTimeout: 250 }, slow)
  app.get('/connection-timeout', slow)
  const port = await listen(app)
  const base = { ...counts }
  await getThenHangUp(port, '/hang-up', 200)
  t.equal((await get(port, '/handler-timeout')).status, 503)
  const cut = await get(port, '/connection-timeout').then((r) => `status ${r.status}`, (e: Error) => e.message)
  t.match(cut, /socket hang up|ECONNRESET/)
  await waitFor(async () => app.db.stats().leased === 0 && (await sleepingQueries(db)) === 0, 5000, 'all released and cancelled')
  t.equal(counts.acquired - base.acquired, 3, 'three checkouts')
  t.equal(counts.released - base.released, 3, 'three releases')
  t.equal(counts.doubleReleases, 0, 'none released twice')
  t.equal(counts.destroyed - base.destroyed, 3, 'each connection that was sent a cancel was closed, not reused')
})
