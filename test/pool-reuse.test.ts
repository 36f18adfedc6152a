// One pool per app: created through @fastify/postgres, or the app's own fastify.pg, or one passed in.
import fastifyPostgres from '@fastify/postgres'
import Fastify from 'fastify'
import pg from 'pg'
import t from 'tap'
import requestDb from '../lib/index.js'
import { createDatabase } from './helpers/db.js'

t.test('by default the pool is created by @fastify/postgres: the app also gets fastify.pg', async (t) => {
  const db = await createDatabase(t)
  const app = Fastify({ logger: false })
  db.closeFirst.push(() => app.close())
  await app.register(requestDb, { env: { DATABASE_URL: db.url, DB_POOL_MAX: '4' } })
  await app.ready()
  const fpg = (app as unknown as { pg: { pool: pg.Pool, query: pg.Pool['query'] } }).pg
  t.equal(app.db.pool, fpg.pool, 'one pool, shared')
  t.equal((fpg.pool as unknown as { options: { max: number } }).options.max, 4, 'configured from env')
  t.equal((await fpg.query('SELECT 1 AS one')).rows[0].one, 1)
})

t.test('an app that already registered @fastify/postgres: its pool is reused, never a second one', async (t) => {
  const db = await createDatabase(t)
  const app = Fastify({ logger: false })
  db.closeFirst.push(() => app.close())
  await app.register(fastifyPostgres, { connectionString: db.url, max: 3 })
  await app.register(requestDb, { env: {} })
  app.get('/', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  await app.ready()
  const fpg = (app as unknown as { pg: { pool: pg.Pool } }).pg
  t.equal(app.db.pool, fpg.pool)
  t.equal((await app.inject('/')).json().one, 1)
  const { rows } = await app.db.query<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND application_name <> 'test-admin'")
  t.ok(rows[0].n <= 3, `at most the app pool's max connections (${rows[0].n})`)
})

t.test('options.pool: used as is, and not ended by app.close() (its owner ends it)', async (t) => {
  const db = await createDatabase(t)
  const pool = new pg.Pool({ connectionString: db.url, max: 2 })
  t.teardown(() => pool.end())
  const app = Fastify({ logger: false })
  await app.register(requestDb, { pool, env: {} })
  app.get('/', async (request) => (await request.db.query('SELECT 2 AS two')).rows[0])
  t.equal(app.db.pool, pool)
  t.equal((await app.inject('/')).json().two, 2)
  await app.close()
  t.equal((await pool.query('SELECT 3 AS three')).rows[0].three, 3, 'still usable after the app closed')
})

t.test('options.pool whose connect() only returns a promise (a wrapper that drops the callback) works too', async (t) => {
  const db = await createDatabase(t)
  const real = new pg.Pool({ connectionString: db.url, max: 2 })
  t.teardown(() => real.end())
  let checkouts = 0
  const promiseOnly = {
    connect: async () => { checkouts++; return await real.connect() },
    end: async () => {},
    on: (event: 'error', listener: (err: Error, client: pg.PoolClient) => void) => real.on(event, listener),
    get totalCount () { return real.totalCount },
    get idleCount () { return real.idleCount },
    get waitingCount () { return real.waitingCount },
    options: { max: 2 }
  }
  const app = Fastify({ logger: false })
  t.teardown(() => app.close())
  await app.register(requestDb, { pool: promiseOnly as unknown as pg.Pool, env: {} })
  app.get('/', async (request) => {
    const a = (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    const b = (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    return { same: a === b }
  })
  const before = checkouts
  const answers = await Promise.all([app.inject('/'), app.inject('/'), app.inject('/')])
  t.same(answers.map((res) => res.json()), [{ same: true }, { same: true }, { same: true }], 'each request kept one connection')
  t.equal(checkouts - before, 3, 'one checkout per request')
  t.equal(app.db.stats().leased, 0, 'all given back')
})
