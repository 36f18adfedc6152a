// Drizzle on request.db (#15), with the real library on the real server: one backend per request,
// Drizzle's transactions nested in a route transaction as savepoints, BEGIN/COMMIT/ROLLBACK sent as
// text, named prepared statements, session state.
import { eq, sql } from 'drizzle-orm'
import { drizzle, type NodePgDatabase } from 'drizzle-orm/node-postgres'
import { pgTable, serial, text } from 'drizzle-orm/pg-core'
import type { FastifyInstance } from 'fastify'
import t, { type Test } from 'tap'
import { FST_REQUEST_DB_TRANSACTION_STATEMENT } from '../lib/index.js'
import { createDrizzle } from '../lib/integrations/drizzle.js'
import { appBackends, buildApp, createDatabase, waitFor } from './helpers/db.js'

const items = pgTable('items', { id: serial('id').primaryKey(), name: text('name').notNull() })

const db = await createDatabase(t)
await db.admin.query(`
  CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
  CREATE SCHEMA other;
  CREATE TABLE other.items (id int)`)

const tx = { config: { db: { transaction: true } } }

async function count (name: string): Promise<number> {
  return (await db.admin.query('SELECT count(*)::int AS n FROM items WHERE name = $1', [name])).rows[0].n
}

async function drizzleApp (t: Test, max = 10): Promise<FastifyInstance> {
  const app = await buildApp(db, { max })
  t.teardown(() => app.close())
  return app
}

async function assertGivenBack (t: Test, app: FastifyInstance, max: number): Promise<void> {
  await waitFor(() => app.db.stats().leased === 0, 5000, 'every client given back')
  const stats = app.db.stats()
  t.equal(stats.leased, 0, 'no client held after the responses')
  t.equal(stats.idle, stats.total, 'every connection idle in the pool')
  t.ok(stats.total <= max, `at most ${max} connections (${stats.total})`)
}

async function pidOf (orm: NodePgDatabase): Promise<number> {
  return (await orm.execute<{ pid: number }>(sql`SELECT pg_backend_pid() AS pid`)).rows[0].pid
}

t.test('every statement of a request on one backend: 200 requests of two queries each, pool max 10', async (t) => {
  const app = await drizzleApp(t, 10)
  // drizzle({ client: request.db }) as it is (its types want a pg class: the cast), and createDrizzle.
  app.get('/as-is', async (request) => {
    const orm = drizzle({ client: request.db as never })
    const [row] = await orm.select({ pid: sql<number>`pg_backend_pid()` }).from(items).limit(1)
      .union(orm.select({ pid: sql<number>`pg_backend_pid()` }).from(sql`(SELECT 1) AS one`))
    return { first: await pidOf(orm), second: row.pid }
  })
  app.get('/helper', async (request) => {
    const orm = createDrizzle(request.db)
    return { first: await pidOf(orm), second: await pidOf(orm) }
  })
  for (const route of ['/as-is', '/helper']) {
    const pids: Array<{ first: number, second: number }> = []
    let peak = 0
    for (let batch = 0; batch < 10; batch++) {
      const answers = await Promise.all(Array.from({ length: 20 }, () => app.inject(route)))
      for (const res of answers) {
        t.equal(res.statusCode, 200)
        pids.push(res.json())
      }
      peak = Math.max(peak, (await appBackends(db)).length)
    }
    t.equal(pids.length, 200)
    t.ok(pids.every(({ first, second }) => first === second), `${route}: both queries of each request on one backend`)
    const distinct = new Set(pids.map((p) => p.first)).size
    t.ok(distinct <= 10, `${route}: ${distinct} distinct backends over 200 requests`)
    t.ok(peak <= 10, `${route}: at most 10 rows in pg_stat_activity (${peak})`)
    await assertGivenBack(t, app, 10)
  }
})

t.test('a route transaction rolls back what Drizzle wrote when the handler throws; commits when it returns', async (t) => {
  const app = await drizzleApp(t)
  app.post('/throws', tx, async (request) => {
    await createDrizzle(request.db).insert(items).values({ name: 'route-throws' })
    throw new Error('after the insert')
  })
  app.post('/returns', tx, async (request) => {
    await createDrizzle(request.db).insert(items).values({ name: 'route-returns' })
    return { ok: true }
  })
  t.equal((await app.inject({ method: 'POST', url: '/throws' })).statusCode, 500)
  t.equal((await app.inject({ method: 'POST', url: '/returns' })).statusCode, 200)
  t.equal(await count('route-throws'), 0, 'rolled back')
  t.equal(await count('route-returns'), 1, 'committed')
  await assertGivenBack(t, app, 10)
})

t.test('Drizzle transaction() inside a route transaction is a savepoint: its rollback keeps the outer work', async (t) => {
  const app = await drizzleApp(t)
  app.post('/inner-fails', tx, async (request) => {
    const orm = createDrizzle(request.db)
    await orm.insert(items).values({ name: 'sp-outer' })
    const outerPid = await pidOf(orm)
    let innerPid = 0
    const inner = await orm.transaction(async (trx) => {
      innerPid = await pidOf(trx)
      await trx.insert(items).values({ name: 'sp-inner' })
      // Drizzle's own nested transaction (its savepoint sp1) inside ours: released.
      await trx.transaction(async (nested) => { await nested.insert(items).values({ name: 'sp-nested' }) })
      trx.rollback()
    }).catch((err: Error) => err.constructor.name)
    const [{ n }] = await orm.select({ n: sql<number>`count(*)::int` }).from(items).where(sql`${items.name} LIKE 'sp-%'`)
    return { inner, sameBackend: innerPid === outerPid, seen: n }
  })
  const res = await app.inject({ method: 'POST', url: '/inner-fails' })
  t.same(res.json(), { inner: 'TransactionRollbackError', sameBackend: true, seen: 1 })
  t.equal(await count('sp-outer'), 1, 'the outer work committed with the route')
  t.equal(await count('sp-inner'), 0, 'the inner transaction rolled back to its savepoint')
  t.equal(await count('sp-nested'), 0, 'and what was nested in it')
  await assertGivenBack(t, app, 10)
})

t.test('a handler that throws after its Drizzle transaction committed leaves nothing of it in the database', async (t) => {
  const app = await drizzleApp(t)
  app.post('/throws-after', tx, async (request) => {
    const orm = createDrizzle(request.db)
    await orm.insert(items).values({ name: 'after-outer' })
    await orm.transaction(async (trx) => { await trx.insert(items).values({ name: 'after-inner' }) })
    t.equal(await count('after-inner'), 0, 'not visible outside before the route commits')
    throw new Error('after the inner commit')
  })
  t.equal((await app.inject({ method: 'POST', url: '/throws-after' })).statusCode, 500)
  t.equal(await count('after-outer'), 0)
  t.equal(await count('after-inner'), 0, 'the inner "commit" did not end the route transaction')
  await assertGivenBack(t, app, 10)
})

t.test('a Drizzle transaction with an isolation level inside a route transaction: 500 FST_REQUEST_DB_TRANSACTION_STATEMENT, nothing committed', async (t) => {
  const app = await drizzleApp(t)
  app.post('/isolation', tx, async (request) => {
    const orm = createDrizzle(request.db)
    await orm.insert(items).values({ name: 'iso-outer' })
    try {
      await orm.transaction(async (trx) => { await trx.insert(items).values({ name: 'iso-inner' }) }, { isolationLevel: 'serializable' })
    } catch (err) {
      // Drizzle wraps every driver error (DrizzleQueryError); the plugin's typed error is its cause.
      t.ok((err as Error).cause instanceof FST_REQUEST_DB_TRANSACTION_STATEMENT, 'the typed error, as the cause of Drizzle\'s')
      throw err
    }
    return { ok: true }
  })
  const res = await app.inject({ method: 'POST', url: '/isolation' })
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT', 'the response carries its code')
  t.equal(await count('iso-outer'), 0)
  t.equal(await count('iso-inner'), 0)
  await assertGivenBack(t, app, 10)
})

t.test('COMMIT or ROLLBACK sent as text through request.db inside a route transaction: 500 FST_REQUEST_DB_TRANSACTION_STATEMENT, nothing committed', async (t) => {
  const app = await drizzleApp(t)
  const statements = ['COMMIT', 'ROLLBACK', 'end']
  for (const statement of statements) {
    app.post(`/${statement}`, tx, async (request) => {
      await request.db.query('INSERT INTO items (name) VALUES ($1)', [`text-${statement}`])
      await request.db.query(statement)
      await request.db.query('INSERT INTO items (name) VALUES ($1)', [`text-${statement}-after`])
      return { ok: true }
    })
  }
  // BEGIN … COMMIT as text is a savepoint there: a handler that throws afterwards keeps nothing.
  app.post('/begin-commit', tx, async (request) => {
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO items (name) VALUES ('text-pair')")
    await request.db.query('COMMIT')
    throw new Error('after the pair')
  })
  for (const statement of statements) {
    const res = await app.inject({ method: 'POST', url: `/${statement}` })
    t.equal(res.statusCode, 500, statement)
    t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT')
    t.match(res.json().message, /would end a transaction it did not begin/)
    t.equal(await count(`text-${statement}`), 0, `${statement}: nothing committed`)
    t.equal(await count(`text-${statement}-after`), 0)
  }
  t.equal((await app.inject({ method: 'POST', url: '/begin-commit' })).statusCode, 500)
  t.equal(await count('text-pair'), 0)
  await assertGivenBack(t, app, 10)
})

t.test('outside a route transaction, a Drizzle transaction is a real one on the request\'s backend, which is reused afterwards', async (t) => {
  const app = await drizzleApp(t, 1)
  app.post('/plain', async (request) => {
    const orm = createDrizzle(request.db)
    const pids = [await pidOf(orm)]
    const before = await count('plain-tx')
    await orm.transaction(async (trx) => {
      pids.push(await pidOf(trx))
      const { rows } = await trx.execute<{ level: string }>(sql`SELECT current_setting('transaction_isolation') AS level`)
      t.equal(rows[0].level, 'repeatable read', 'a real transaction, with its isolation level')
      await trx.insert(items).values({ name: 'plain-tx' })
    }, { isolationLevel: 'repeatable read' })
    t.equal(await count('plain-tx'), before + 1, 'committed at the end of Drizzle\'s transaction')
    return pids
  })
  const pids: number[] = [...(await app.inject({ method: 'POST', url: '/plain' })).json(), ...(await app.inject({ method: 'POST', url: '/plain' })).json()]
  t.equal(pids.length, 4)
  t.equal(new Set(pids).size, 1, 'one backend for both requests: the connection went back to the pool, not closed')
  await assertGivenBack(t, app, 1)
})

t.test('Drizzle named prepared statements (.prepare(name)) work across requests on reused connections', async (t) => {
  const app = await drizzleApp(t, 2)
  await db.admin.query("INSERT INTO items (name) VALUES ('prepared-a'), ('prepared-b'), ('prepared-b')")
  app.get<{ Querystring: { name: string } }>('/by-name', async (request) => {
    const orm = createDrizzle(request.db)
    const byName = orm.select({ name: items.name }).from(items).where(eq(items.name, sql.placeholder('name'))).prepare('items_by_name')
    const rows = await byName.execute({ name: request.query.name })
    const again = await byName.execute({ name: 'prepared-a' })
    return { found: rows.length, again: again.length, pid: await pidOf(orm) }
  })
  const answers = []
  for (let batch = 0; batch < 8; batch++) {
    answers.push(...await Promise.all(['prepared-a', 'prepared-b', 'none', 'prepared-b', 'prepared-a']
      .map(async (name) => ({ name, res: await app.inject(`/by-name?name=${name}`) }))))
  }
  for (const { name, res } of answers) {
    t.equal(res.statusCode, 200)
    t.same({ found: res.json().found, again: res.json().again }, { found: { 'prepared-a': 1, 'prepared-b': 2, none: 0 }[name], again: 1 })
  }
  const pids = new Set(answers.map(({ res }) => res.json().pid))
  t.ok(pids.size <= 2, `40 requests on at most 2 backends (${pids.size}): connections kept, each preparing once`)
  await assertGivenBack(t, app, 2)
})

t.test('SET search_path through Drizzle is not seen by the next request: its connection is closed', async (t) => {
  const app = await drizzleApp(t, 1)
  const pathAndPid = sql`SELECT current_setting('search_path') AS path, pg_backend_pid() AS pid`
  app.post('/set', async (request) => {
    const orm = createDrizzle(request.db)
    await orm.execute(sql`SET search_path TO other`)
    return (await orm.execute(pathAndPid)).rows[0]
  })
  app.get('/path', async (request) => (await createDrizzle(request.db).execute(pathAndPid)).rows[0])
  const set = (await app.inject({ method: 'POST', url: '/set' })).json()
  t.equal(set.path, 'other')
  const next = (await app.inject('/path')).json()
  t.equal(next.path, '"$user", public', 'the next request has the default search_path')
  t.not(next.pid, set.pid, 'on another backend')
  await assertGivenBack(t, app, 1)
})

t.test('a typed 503 through Drizzle stays a 503 with Retry-After (Drizzle wraps it as the cause)', async (t) => {
  const app = await buildApp(db, { max: 1, acquireTimeoutMs: 200 })
  t.teardown(() => app.close())
  app.get('/hold', async (request) => {
    await createDrizzle(request.db).execute(sql`SELECT pg_sleep(2)`)
    return 'held'
  })
  app.get('/quick', async (request) => createDrizzle(request.db).select({ name: items.name }).from(items).limit(1))
  await app.ready()
  const holding = app.inject('/hold')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the holder')
  const res = await app.inject('/quick')
  t.equal(res.statusCode, 503)
  t.equal(res.json().code, 'FST_REQUEST_DB_ACQUIRE_TIMEOUT')
  t.equal(res.headers['retry-after'], '1')
  t.equal((await holding).body, 'held')
  await assertGivenBack(t, app, 1)
})
