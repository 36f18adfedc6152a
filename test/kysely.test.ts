// Kysely on request.db (#15), with the real library on the real server: one backend per request,
// transactions (Kysely's own, nested in a route transaction as savepoints), streaming with
// pg-cursor, session state, and the `fastify-request-db/kysely` plugin (request.kysely).
import type { FastifyInstance } from 'fastify'
import Fastify from 'fastify'
import { CamelCasePlugin, type Generated, Kysely, PostgresDialect, sql } from 'kysely'
import Cursor from 'pg-cursor'
import t, { type Test } from 'tap'
import requestDb from '../lib/index.js'
import requestKysely, { kyselyFactory } from '../lib/integrations/kysely.js'
import { appBackends, buildApp, createDatabase, waitFor } from './helpers/db.js'

interface DB {
  items: { id: Generated<number>, name: string, created_at: Generated<Date> }
  numbers: { n: number }
}

// How an app declares its database once for request.kysely.
declare module '../lib/integrations/kysely.js' {
  interface KyselyDatabase extends DB {}
}

const db = await createDatabase(t)
await db.admin.query(`
  CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
  CREATE TABLE numbers (n int PRIMARY KEY);
  INSERT INTO numbers SELECT generate_series(1, 3000);
  CREATE SCHEMA other;
  CREATE TABLE other.items (id int)`)

const tx = { config: { db: { transaction: true } } }

async function count (name: string): Promise<number> {
  return (await db.admin.query('SELECT count(*)::int AS n FROM items WHERE name = $1', [name])).rows[0].n
}

/** An app with fastify-request-db and fastify-request-db/kysely; closed when the test ends. */
async function kyselyApp (t: Test, max = 10): Promise<FastifyInstance> {
  const app = await buildApp(db, { max })
  t.teardown(() => app.close())
  await app.register(requestKysely, { cursor: Cursor })
  return app
}

/** Nothing is held once the responses are out, and no backend beyond the pool's `max`. */
async function assertGivenBack (t: Test, app: FastifyInstance, max: number): Promise<void> {
  await waitFor(() => app.db.stats().leased === 0, 5000, 'every client given back')
  const stats = app.db.stats()
  t.equal(stats.leased, 0, 'no client held after the responses')
  t.equal(stats.idle, stats.total, 'every connection idle in the pool')
  t.ok(stats.total <= max, `at most ${max} connections (${stats.total})`)
}

function pidOf (kysely: Kysely<DB>): Promise<number> {
  return sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`.execute(kysely).then((r) => r.rows[0].pid)
}

type Pids = { first: number, second: number }

t.test('every statement of a request on one backend: 200 requests of two queries each, pool max 10', async (t) => {
  const app = await kyselyApp(t, 10)
  // As the issue writes it, a Kysely per request on request.db; and the plugin's request.kysely.
  app.get('/dialect', async (request): Promise<Pids> => {
    const kysely = new Kysely<DB>({ dialect: new PostgresDialect({ pool: request.db }) })
    const first = await pidOf(kysely)
    const { pid } = await kysely.selectFrom('items').select(sql<number>`pg_backend_pid()`.as('pid'))
      .union(kysely.selectNoFrom(sql<number>`pg_backend_pid()`.as('pid'))).executeTakeFirstOrThrow()
    // destroy() ends the "pool": request.db.end() does nothing, the request still gives it back.
    await kysely.destroy()
    return { first, second: pid }
  })
  app.get('/plugin', async (request): Promise<Pids> => ({ first: await pidOf(request.kysely), second: await pidOf(request.kysely) }))

  for (const route of ['/dialect', '/plugin']) {
    const pids: Pids[] = []
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

t.test('a route transaction rolls back what Kysely wrote when the handler throws; commits when it returns', async (t) => {
  const app = await kyselyApp(t)
  app.post('/throws', tx, async (request) => {
    await request.kysely.insertInto('items').values({ name: 'route-throws' }).execute()
    throw new Error('after the insert')
  })
  app.post('/returns', tx, async (request) => {
    await request.kysely.insertInto('items').values({ name: 'route-returns' }).execute()
    return { ok: true }
  })
  t.equal((await app.inject({ method: 'POST', url: '/throws' })).statusCode, 500)
  t.equal((await app.inject({ method: 'POST', url: '/returns' })).statusCode, 200)
  t.equal(await count('route-throws'), 0, 'rolled back')
  t.equal(await count('route-returns'), 1, 'committed')
  await assertGivenBack(t, app, 10)
})

t.test('Kysely transaction() inside a route transaction is a savepoint: its rollback keeps the outer work', async (t) => {
  const app = await kyselyApp(t)
  app.post('/inner-fails', tx, async (request) => {
    await request.kysely.insertInto('items').values({ name: 'sp-outer' }).execute()
    const outerPid = await pidOf(request.kysely)
    let innerPid = 0
    const inner = await request.kysely.transaction().execute(async (trx) => {
      innerPid = await pidOf(trx)
      await trx.insertInto('items').values({ name: 'sp-inner' }).execute()
      throw new Error('inner fails')
    }).catch((err: Error) => err.message)
    // The route's transaction goes on: a statement after the inner rollback still runs in it.
    const { n } = await request.kysely.selectFrom('items').select((eb) => eb.fn.countAll<number>().as('n'))
      .where('name', 'in', ['sp-outer', 'sp-inner']).executeTakeFirstOrThrow()
    return { inner, sameBackend: innerPid === outerPid, seen: Number(n) }
  })
  const res = await app.inject({ method: 'POST', url: '/inner-fails' })
  t.same(res.json(), { inner: 'inner fails', sameBackend: true, seen: 1 })
  t.equal(await count('sp-outer'), 1, 'the outer work committed with the route')
  t.equal(await count('sp-inner'), 0, 'the inner transaction rolled back to its savepoint')
  await assertGivenBack(t, app, 10)
})

t.test('a handler that throws after its Kysely transaction committed leaves nothing of it in the database', async (t) => {
  const app = await kyselyApp(t)
  app.post('/throws-after', tx, async (request) => {
    await request.kysely.insertInto('items').values({ name: 'after-outer' }).execute()
    await request.kysely.transaction().execute(async (trx) => {
      await trx.insertInto('items').values({ name: 'after-inner' }).execute()
    })
    // Committed as far as Kysely knows, but only a savepoint was released.
    t.equal(await count('after-inner'), 0, 'not visible outside before the route commits')
    throw new Error('after the inner commit')
  })
  t.equal((await app.inject({ method: 'POST', url: '/throws-after' })).statusCode, 500)
  t.equal(await count('after-outer'), 0)
  t.equal(await count('after-inner'), 0, 'the inner "commit" did not end the route transaction')
  await assertGivenBack(t, app, 10)
})

t.test('a Kysely transaction with an isolation level inside a route transaction: 500 FST_REQUEST_DB_TRANSACTION_STATEMENT, nothing committed', async (t) => {
  const app = await kyselyApp(t)
  app.post('/isolation', tx, async (request) => {
    await request.kysely.insertInto('items').values({ name: 'iso-outer' }).execute()
    return request.kysely.transaction().setIsolationLevel('serializable').execute(async (trx) => {
      await trx.insertInto('items').values({ name: 'iso-inner' }).execute()
    })
  })
  const res = await app.inject({ method: 'POST', url: '/isolation' })
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT')
  t.match(res.json().message, /BEGIN with options inside a transaction/)
  t.equal(await count('iso-outer'), 0)
  t.equal(await count('iso-inner'), 0)
  await assertGivenBack(t, app, 10)
})

t.test('outside a route transaction, Kysely transaction() and connection() run on the request\'s backend, which is reused afterwards', async (t) => {
  const app = await kyselyApp(t, 1)
  app.post('/plain', async (request) => {
    const pids = [await pidOf(request.kysely)]
    const before = await count('plain-tx')
    await request.kysely.transaction().setIsolationLevel('repeatable read').execute(async (trx) => {
      pids.push(await pidOf(trx))
      const { rows } = await sql<{ level: string }>`SELECT current_setting('transaction_isolation') AS level`.execute(trx)
      t.equal(rows[0].level, 'repeatable read', 'a real transaction, with its isolation level')
      await trx.insertInto('items').values({ name: 'plain-tx' }).execute()
    })
    t.equal(await count('plain-tx'), before + 1, 'committed at the end of Kysely\'s transaction')
    await request.kysely.connection().execute(async (connection) => { pids.push(await pidOf(connection)) })
    // Inside request.db.transaction(), Kysely's transaction nests as a savepoint too.
    await request.db.transaction(async () => {
      await request.kysely.insertInto('items').values({ name: 'db-tx-outer' }).execute()
      await request.kysely.transaction().execute(async (trx) => {
        await trx.insertInto('items').values({ name: 'db-tx-inner' }).execute()
        throw new Error('inner fails')
      }).catch(() => {})
    })
    return pids
  })
  const first = await app.inject({ method: 'POST', url: '/plain' })
  const second = await app.inject({ method: 'POST', url: '/plain' })
  const pids: number[] = [...first.json(), ...second.json()]
  t.equal(pids.length, 6)
  t.equal(new Set(pids).size, 1, 'one backend for both requests: the connection went back to the pool, not closed')
  t.equal(await count('db-tx-outer'), 2)
  t.equal(await count('db-tx-inner'), 0)
  await assertGivenBack(t, app, 1)
})

t.test('Kysely .stream() with pg-cursor runs on the request\'s backend; a stream left early closes its cursor', async (t) => {
  const app = await kyselyApp(t, 1)
  app.get('/stream', async (request) => {
    const before = await pidOf(request.kysely)
    let rows = 0
    let sum = 0
    for await (const row of request.kysely.selectFrom('numbers').select('n').orderBy('n').stream(500)) {
      rows++
      sum += row.n
    }
    // Left after the first row: Kysely closes the cursor, and the connection goes on serving.
    for await (const row of request.kysely.selectFrom('numbers').select('n').orderBy('n').stream(100)) {
      if (row.n === 1) break
    }
    return { rows, sum, sameBackend: before === await pidOf(request.kysely), pid: before }
  })
  const first = (await app.inject('/stream')).json()
  t.same({ rows: first.rows, sum: first.sum, sameBackend: first.sameBackend }, { rows: 3000, sum: 3000 * 3001 / 2, sameBackend: true })
  const second = (await app.inject('/stream')).json()
  t.equal(second.pid, first.pid, 'the connection was given back to the pool, not closed')
  await assertGivenBack(t, app, 1)
})

t.test('SET search_path through Kysely is not seen by the next request: its connection is closed', async (t) => {
  const app = await kyselyApp(t, 1)
  const pathAndPid = sql<{ path: string, pid: number }>`SELECT current_setting('search_path') AS path, pg_backend_pid() AS pid`
  app.post('/set', async (request) => {
    await sql`SET search_path TO other`.execute(request.kysely)
    return (await pathAndPid.execute(request.kysely)).rows[0]
  })
  app.get('/path', async (request) => (await pathAndPid.execute(request.kysely)).rows[0])
  const set = (await app.inject({ method: 'POST', url: '/set' })).json()
  t.equal(set.path, 'other')
  const next = (await app.inject('/path')).json()
  t.equal(next.path, '"$user", public', 'the next request has the default search_path')
  t.not(next.pid, set.pid, 'on another backend')
  await assertGivenBack(t, app, 1)
})

t.test('request.kysely: built only when read, one per request, with the options given', async (t) => {
  const app = Fastify({ logger: false })
  t.teardown(() => app.close())
  let early: unknown
  // An onRequest hook that runs before fastify-request-db's sees null, as it does for request.db.
  app.addHook('onRequest', async (request) => { early = request.kysely })
  await app.register(requestDb, { env: { DATABASE_URL: db.url } })
  await app.register(requestKysely, { plugins: [new CamelCasePlugin()] })
  const built = (request: object): boolean => Object.getOwnPropertySymbols(request).some((s) => s.description === 'fastify-request-db.kysely')
  app.get('/unused', async (request) => ({ built: built(request), own: Object.hasOwn(request, 'kysely') }))
  app.get('/used', async (request) => {
    const same = request.kysely === request.kysely
    await request.kysely.insertInto('items').values({ name: 'camel' }).execute()
    const row = await request.kysely.selectFrom('items').selectAll().where('name', '=', 'camel').executeTakeFirstOrThrow()
    return { same, built: built(request), keys: Object.keys(row).sort() }
  })
  t.same((await app.inject('/unused')).json(), { built: false, own: false }, 'a route that does not read it builds nothing')
  t.same((await app.inject('/used')).json(), { same: true, built: true, keys: ['createdAt', 'id', 'name'] }, 'CamelCasePlugin from the options')
  t.equal(early, null)
})

t.test('kyselyFactory<DB>() binds the same Kysely to a request without the plugin, logging with the log option', async (t) => {
  const app = await buildApp(db, { max: 1 })
  t.teardown(() => app.close())
  const events: Array<{ level: string, sql: string, isStream?: boolean }> = []
  const bind = kyselyFactory<DB>({ cursor: Cursor, log: (event) => { events.push({ level: event.level, sql: event.query.sql, ...(event.level === 'query' && event.isStream ? { isStream: true } : {}) }) } })
  app.get('/', async (request) => {
    const kysely = bind(request.db)
    const a = await pidOf(kysely)
    await sql`SELECT 1/0`.execute(kysely).catch(() => {})
    let streamed = 0
    for await (const row of kysely.selectFrom('numbers').select('n').where('n', '<=', 3).stream(2)) streamed += row.n
    const failed = await (async () => {
      for await (const row of kysely.selectFrom('numbers').select(sql<number>`1 / (n - n)`.as('x')).stream(2)) return row
    })().catch((err: { code?: string }) => err.code)
    return { same: a === await pidOf(kysely), streamed, failed }
  })
  t.same((await app.inject('/')).json(), { same: true, streamed: 6, failed: '22012' })
  t.same(events.map((e) => e.level), ['query', 'error', 'query', 'error', 'query'])
  t.match(events[1].sql, /1\/0/)
  t.same(events[2].isStream, true, 'the stream logged once it ended')
  t.match(events[3].sql, /1 \/ \(n - n\)/, 'a failed stream logged as an error')
  await assertGivenBack(t, app, 1)
})

t.test('Kysely\'s controlled transaction and its savepoints inside a route transaction', async (t) => {
  const app = await kyselyApp(t)
  app.post('/controlled', tx, async (request) => {
    const trx = await request.kysely.startTransaction().execute()
    await trx.insertInto('items').values({ name: 'ctl-kept' }).execute()
    const sp = await trx.savepoint('before_drop').execute()
    await sp.insertInto('items').values({ name: 'ctl-dropped' }).execute()
    await sp.rollbackToSavepoint('before_drop').execute()
    await trx.commit().execute()
    return { ok: true }
  })
  t.equal((await app.inject({ method: 'POST', url: '/controlled' })).statusCode, 200)
  t.equal(await count('ctl-kept'), 1)
  t.equal(await count('ctl-dropped'), 0)
  await assertGivenBack(t, app, 10)
})

t.test('a Kysely transaction in which a statement failed is never reported committed', async (t) => {
  const app = await kyselyApp(t)
  const swallowing = (name: string) => async (trx: Kysely<DB>): Promise<void> => {
    await trx.insertInto('items').values({ name }).execute()
    await sql`SELECT 1/0`.execute(trx).catch(() => {})
  }
  // On its own: COMMIT answers ROLLBACK, which Kysely turns into AbortedTransactionError.
  app.post('/plain', async (request) => request.kysely.transaction().execute(swallowing('aborted-plain')).then(() => 'committed', (err: Error) => err.name))
  // As a savepoint: RELEASE fails in the aborted transaction, Kysely rolls back to the savepoint,
  // and the route's transaction goes on.
  app.post('/nested', tx, async (request) => {
    const inner = await request.kysely.transaction().execute(swallowing('aborted-nested')).then(() => 'committed', (err: Error) => (err as { code?: string }).code)
    await request.kysely.insertInto('items').values({ name: 'aborted-nested-outer' }).execute()
    return inner
  })
  t.equal((await app.inject({ method: 'POST', url: '/plain' })).body, 'AbortedTransactionError')
  const nested = await app.inject({ method: 'POST', url: '/nested' })
  t.equal(nested.statusCode, 200)
  t.equal(nested.body, '25P02', 'in_failed_sql_transaction')
  t.equal(await count('aborted-plain'), 0)
  t.equal(await count('aborted-nested'), 0)
  t.equal(await count('aborted-nested-outer'), 1)
  await assertGivenBack(t, app, 10)
})

t.test('.stream() without pg-cursor fails, saying what to register', async (t) => {
  const app = await buildApp(db, { max: 1 })
  t.teardown(() => app.close())
  await app.register(requestKysely)
  app.get('/', async (request) => {
    for await (const row of request.kysely.selectFrom('numbers').select('n').stream()) return row
    return null
  })
  const res = await app.inject('/')
  t.equal(res.statusCode, 500)
  t.match(res.json().message, /\.stream\(\) needs pg-cursor/)
  await assertGivenBack(t, app, 1)
})

t.test('the plugin needs fastify-request-db, and checks its options at registration', async (t) => {
  const alone = Fastify({ logger: false })
  t.teardown(() => alone.close())
  await t.rejects(async () => { await alone.register(requestKysely).ready() }, /fastify-request-db/, 'registered without fastify-request-db')
  for (const [options, code] of [[{ cursor: 'pg-cursor' }, /Invalid cursor=string/], [{ plugins: {} }, /Invalid plugins=object/], [{ log: 'query' }, /Invalid log=string/]] as const) {
    const app = Fastify({ logger: false })
    t.teardown(() => app.close())
    await app.register(requestDb, { env: { DATABASE_URL: db.url } })
    await t.rejects(async () => { await app.register(requestKysely, options as never).ready() }, { code: 'FST_REQUEST_DB_INVALID_OPTION', message: code })
  }
})
