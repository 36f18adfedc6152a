// request.db: one lazily taken client per request, shared by the request's queries.
import t from 'tap'
import Fastify from 'fastify'
import requestDb from '../lib/index.js'
import { appBackends, buildApp, countingPool, createDatabase, waitFor } from './helpers/db.js'

t.test('a route that never uses request.db takes no client; the first query takes one', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { idleTimeoutMs: 0 })
  app.get('/none', async (request) => ({ handle: typeof request.db.query }))
  app.get('/pid', async (request) => {
    const before = app.db.stats().leased
    const a = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    const b = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    return { before, during: app.db.stats().leased, a: a.rows[0].pid, b: b.rows[0].pid }
  })
  await app.ready()
  // The connectivity check at ready left one idle client; make the pool empty to see what requests take.
  const idleBefore = app.db.stats()
  const none = await app.inject('/none')
  t.same(none.json(), { handle: 'function' }, 'the handle exists')
  t.same(app.db.stats(), idleBefore, 'the pool was not touched')

  const res = await app.inject('/pid')
  const body = res.json()
  t.equal(body.before, 0, 'nothing leased before the first query')
  t.equal(body.during, 1, 'one client leased during the request')
  t.equal(body.a, body.b, 'both queries ran on the same connection')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
  t.equal(app.db.stats().leased, 0)
})

t.test('concurrent first queries share one acquisition', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  app.get('/', async (request) => {
    const rows = await Promise.all([1, 2, 3].map(() => request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')))
    return new Set(rows.map((r) => r.rows[0].pid)).size
  })
  const res = await app.inject('/')
  t.equal(res.json(), 1)
})

t.test('query accepts a QueryConfig and values; rows are what pg returns', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  app.get('/', async (request) => {
    const a = await request.db.query<{ n: number }>('SELECT $1::int AS n', [41])
    const b = await request.db.query<{ s: string }>({ text: 'SELECT $1::text AS s', values: ['x'] })
    const c = await request.db.query({ text: 'SELECT 1 AS one', name: 'named-one' })
    return { n: a.rows[0].n + 1, s: b.rows[0].s, one: c.rows[0].one, command: a.command }
  })
  t.same((await app.inject('/')).json(), { n: 42, s: 'x', one: 1, command: 'SELECT' })
})

t.test('request.db.transaction: commit, rollback and rethrow, nested savepoints', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE items (name text PRIMARY KEY)')
  const app = await buildApp(db)
  app.post('/commit', async (request) => {
    return request.db.transaction(async (tx) => {
      await tx.query("INSERT INTO items VALUES ('committed')")
      return 'ok'
    })
  })
  app.post('/rollback', async (request) => {
    await request.db.transaction(async (tx) => {
      await tx.query("INSERT INTO items VALUES ('rolled-back')")
      throw Object.assign(new Error('nope'), { statusCode: 409 })
    })
  })
  app.post('/nested', async (request) => {
    return request.db.transaction(async (tx) => {
      await tx.query("INSERT INTO items VALUES ('outer')")
      const inner = await tx.transaction(async (inner) => {
        await inner.query("INSERT INTO items VALUES ('inner-kept')")
        return 'inner-ok'
      })
      const failed = await tx.transaction(async (inner) => {
        await inner.query("INSERT INTO items VALUES ('inner-undone')")
        await inner.query('SELECT 1/0')
      }).catch((err: Error) => err.message)
      await tx.query("INSERT INTO items VALUES ('after-savepoint')")
      return { inner, failed }
    })
  })
  app.post('/swallowed', async (request) => {
    // The statement's error is caught inside: COMMIT then rolls back, which must not look like success.
    return request.db.transaction(async (tx) => {
      await tx.query("INSERT INTO items VALUES ('swallowed')")
      await tx.query('SELECT 1/0').catch(() => {})
      return 'claimed ok'
    })
  })

  t.equal((await app.inject({ method: 'POST', url: '/commit' })).body, 'ok')
  const rb = await app.inject({ method: 'POST', url: '/rollback' })
  t.equal(rb.statusCode, 409, 'the handler\'s error reaches the client')
  t.same((await app.inject({ method: 'POST', url: '/nested' })).json(), { inner: 'inner-ok', failed: 'division by zero' })
  const swallowed = await app.inject({ method: 'POST', url: '/swallowed' })
  t.equal(swallowed.statusCode, 500)
  t.equal(swallowed.json().code, 'FST_REQUEST_DB_COMMIT_FAILED')

  const { rows } = await db.admin.query('SELECT name FROM items ORDER BY name')
  t.same(rows.map((r) => r.name), ['after-savepoint', 'committed', 'inner-kept', 'outer'])
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('request.db.client(): the raw PoolClient; user release() breaks nothing', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  app.get('/', async (request) => {
    const client = await request.db.client()
    const viaClient = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    const viaHandle = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    client.release()
    client.release() // a second release by user code must not throw or double-release
    const afterRelease = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    return { same: viaClient.rows[0].pid === viaHandle.rows[0].pid, again: typeof afterRelease.rows[0].pid }
  })
  const res = await app.inject('/')
  t.equal(res.statusCode, 200, res.body)
  t.same(res.json(), { same: true, again: 'number' }, 'same connection; after release() a fresh one is taken')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
  t.equal(app.db.stats().leased, 0)
})

t.test('request.db after the response was sent: FST_REQUEST_DB_RELEASED and no connection', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { idleTimeoutMs: 1 })
  let late: Promise<unknown> = Promise.resolve()
  let lateUsed: Promise<unknown> = Promise.resolve()
  app.get('/never-used', async (request, reply) => {
    await reply.send('early')
    late = new Promise((resolve) => setTimeout(resolve, 30)).then(() => request.db.query('SELECT 1')).then(() => null, (e) => e)
    return reply
  })
  app.get('/used', async (request, reply) => {
    await request.db.query('SELECT 1')
    reply.send('done')
    lateUsed = new Promise((resolve) => setTimeout(resolve, 30)).then(() => request.db.query('SELECT 1')).then(() => null, (e) => e)
    return reply
  })
  await app.ready()
  await waitFor(() => app.db.stats().total === 0, 3000, 'idle clients closed')
  t.equal((await app.inject('/never-used')).body, 'early')
  const err = await late as { code?: string }
  t.equal(err?.code, 'FST_REQUEST_DB_RELEASED')
  t.equal(app.db.stats().total, 0, 'no connection was opened')
  t.equal((await appBackends(db)).length, 0, 'the server sees no backend of the app')

  t.equal((await app.inject('/used')).body, 'done')
  t.equal(((await lateUsed) as { code?: string })?.code, 'FST_REQUEST_DB_RELEASED', 'also after the lease was used')
})

t.test('app.db: query, transaction and stats', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE jobs (id int PRIMARY KEY)')
  const app = await buildApp(db, { max: 3 })
  await app.ready()
  t.equal((await app.db.query<{ n: number }>('SELECT $1::int AS n', [7])).rows[0].n, 7)
  await app.db.transaction(async (tx) => { await tx.query('INSERT INTO jobs VALUES (1)') })
  await t.rejects(app.db.transaction(async (tx) => {
    await tx.query('INSERT INTO jobs VALUES (2)')
    throw new Error('undo')
  }), { message: 'undo' })
  t.same((await db.admin.query('SELECT id FROM jobs')).rows, [{ id: 1 }])
  const stats = app.db.stats()
  t.same(Object.keys(stats).sort(), ['idle', 'leaksDetected', 'leased', 'total', 'waiting'])
  t.equal(stats.leased, 0)
  t.ok(stats.total >= 1 && stats.total <= 3)
  t.equal(typeof app.db.pool.connect, 'function')
})

t.test('statementTimeoutMs (DB_STATEMENT_TIMEOUT_MS) is the server-side statement_timeout', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { env: { DATABASE_URL: db.url, DB_STATEMENT_TIMEOUT_MS: '150' } })
  app.get('/setting', async (request) => (await request.db.query("SELECT current_setting('statement_timeout') AS v")).rows[0])
  app.get('/slow', async (request) => {
    await request.db.query('SELECT pg_sleep(2)')
    return 'finished'
  })
  t.same((await app.inject('/setting')).json(), { v: '150ms' })
  const started = Date.now()
  const res = await app.inject('/slow')
  t.equal(res.statusCode, 500)
  t.match(res.json().message, /statement timeout/)
  t.ok(Date.now() - started < 1500, 'stopped by the server, not after the full sleep')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('an onRequest hook that fails before the plugin\'s: request.db is null, the error answers, nothing is taken', async (t) => {
  const db = await createDatabase(t)
  const app = Fastify({ logger: false })
  db.closeFirst.push(() => app.close())
  let seen: unknown = 'not called'
  app.addHook('onRequest', async () => { throw Object.assign(new Error('refused early'), { statusCode: 403 }) })
  app.addHook('onError', async (request) => { seen = request.db })
  await app.register(requestDb, { env: { DATABASE_URL: db.url } })
  app.get('/', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  await app.ready()
  const before = app.db.stats()
  const res = await app.inject('/')
  t.equal(res.statusCode, 403, 'the failing hook\'s error is the answer')
  t.equal(seen, null, 'request.db is null where the plugin\'s onRequest did not run')
  t.same(app.db.stats(), before, 'no client taken')
})

t.test('request.db can be replaced (a test double); the plugin still gives its own client back', async (t) => {
  const db = await createDatabase(t)
  const { pool, counts } = countingPool(db.url)
  db.closeFirst.push(() => pool.end())
  const app = await buildApp(db, { pool, env: {} })
  app.get('/', async (request) => {
    const real = await request.db.query<{ n: number }>('SELECT 1 AS n')
    request.db = { query: async () => ({ rows: [{ n: 2 }] }) } as never
    const fake = await request.db.query<{ n: number }>('SELECT 1 AS n')
    return { real: real.rows[0].n, fake: fake.rows[0].n }
  })
  await app.ready()
  const acquiredBefore = counts.acquired
  t.same((await app.inject('/')).json(), { real: 1, fake: 2 }, 'code reads the assigned value after the assignment')
  await waitFor(() => counts.released === counts.acquired, 2000, 'release')
  t.equal(counts.acquired - acquiredBefore, 1, 'one client taken')
  t.equal(counts.released, counts.acquired, 'and given back')
  t.equal(counts.doubleReleases, 0)
})
