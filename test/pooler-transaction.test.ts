// `pooler: 'transaction'` with a real PgBouncer 1.x (pool_mode = transaction) between the app and
// PostgreSQL (issue #21): session state refused before it is sent or made transaction-local, named
// statements run unnamed, route transactions, cancel, acquire timeouts, shutdown and recovery, and
// 200 interleaved requests of which some try to set session state: none may see another's.
// The classifier and the option checks need no PgBouncer and always run.
import { eq, sql } from 'drizzle-orm'
import { pgTable, serial, text } from 'drizzle-orm/pg-core'
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import QueryStream from 'pg-query-stream'
import t from 'tap'
import requestDb, { FST_REQUEST_DB_POOLER_REFUSED } from '../lib/index.js'
import { resolveOptions } from '../lib/options.js'
import { createDrizzle } from '../lib/integrations/drizzle.js'
import { poolerStatement } from '../lib/pooler.js'
import { startPgBouncer } from '../scripts/pgbouncer.mjs'
import { adminUrl, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { ABORT_GRACE_MS, addRoutes, assertHangUps, hangUpRepeatedly } from './helpers/hang-up.js'
import { havePgBouncer } from './helpers/pgbouncer.js'

t.test('options: pooler and DB_POOLER; statementTimeoutMs with pooler=transaction is refused at startup', async (t) => {
  t.equal(resolveOptions({ env: {} }).pooler, 'none', 'default: none')
  t.equal(resolveOptions({ env: { DB_POOLER: 'transaction' } }).pooler, 'transaction', 'from DB_POOLER')
  t.equal(resolveOptions({ pooler: 'none', env: { DB_POOLER: 'transaction' } }).pooler, 'none', 'the option wins over env')
  t.throws(() => resolveOptions({ env: { DB_POOLER: 'session' } }), { code: 'FST_REQUEST_DB_INVALID_OPTION', message: 'Invalid DB_POOLER="session": must be "none" or "transaction"' })
  t.throws(() => resolveOptions({ pooler: 'statement' as never, env: {} }), { message: /^Invalid pooler="statement"/ })
  t.throws(() => resolveOptions({ pooler: 'transaction', statementTimeoutMs: 5000, env: {} }),
    { code: 'FST_REQUEST_DB_INVALID_OPTION', message: /^Invalid statementTimeoutMs=5000: cannot be applied with pooler=transaction .*ALTER ROLE/ })
  t.throws(() => resolveOptions({ env: { DB_POOLER: 'transaction', DB_STATEMENT_TIMEOUT_MS: '100' } }), { message: /statementTimeoutMs=100.*pooler=transaction/ })
  const app = Fastify()
  await t.rejects(async () => {
    await app.register(requestDb, { pooler: 'transaction', statementTimeoutMs: 1000, env: { DATABASE_URL: adminUrl } })
    await app.ready()
  },
    { code: 'FST_REQUEST_DB_INVALID_OPTION', message: /statementTimeoutMs=1000.*pooler=transaction/ }, 'ready() rejects, naming the option and the pooler')
  await app.close()
})

t.test('the classifier: refused outside a transaction, SET made LOCAL inside one, the harmless let through', async (t) => {
  const refusedBoth = [
    "SELECT set_config('app.tenant', '7', false)",
    "select set_config('app.tenant', $1, $2)",
    'SELECT pg_advisory_lock(42)',
    'SELECT pg_try_advisory_lock_shared(1, 2)',
    'LISTEN jobs',
    "PREPARE q AS SELECT 1",
    'SELECT 1; SET search_path TO other',
    'SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY',
    'CREATE TEMP TABLE scratch (id int)',
    'DECLARE c CURSOR WITH HOLD FOR SELECT 1',
    "LOAD 'auto_explain'",
    'DISCARD ALL',
    'DEALLOCATE ALL'
  ]
  for (const sql of refusedBoth) {
    for (const inTx of [false, true]) {
      const got = poolerStatement(sql, inTx)
      t.ok(got instanceof FST_REQUEST_DB_POOLER_REFUSED, `${inTx ? 'inside' : 'outside'} a transaction, refused: ${sql}`)
    }
  }
  const setForms: Array<[string, string]> = [
    ['SET search_path TO other', 'SET LOCAL search_path TO other'],
    ['set session app.tenant = 7', 'SET LOCAL app.tenant = 7'],
    ['SET ROLE reader', 'SET LOCAL ROLE reader'],
    ['SET SESSION AUTHORIZATION reader', 'SET LOCAL SESSION AUTHORIZATION reader'],
    ['/* tenant */ SET TIME ZONE \'UTC\';', '/* tenant */ SET LOCAL TIME ZONE \'UTC\';']
  ]
  for (const [sql, local] of setForms) {
    t.ok(poolerStatement(sql, false) instanceof FST_REQUEST_DB_POOLER_REFUSED, `outside a transaction, refused: ${sql}`)
    t.equal(poolerStatement(sql, true), local, `inside one, sent as: ${local}`)
  }
  for (const sql of ['RESET search_path', 'RESET ALL', 'SET CONSTRAINTS ALL DEFERRED']) {
    t.equal(poolerStatement(sql, false), sql, `let through outside a transaction: ${sql}`)
  }
  for (const sql of ['CREATE TEMP TABLE scratch (id int) ON COMMIT DROP', 'DECLARE c CURSOR FOR SELECT 1']) {
    t.ok(poolerStatement(sql, false) instanceof FST_REQUEST_DB_POOLER_REFUSED, `outside a transaction, refused: ${sql}`)
    t.equal(poolerStatement(sql, true), sql, `inside one, sent as it is: ${sql}`)
  }
})

const notes = pgTable('notes', { id: serial('id').primaryKey(), body: text('body').notNull() })

if (havePgBouncer(t, 'test/pooler-transaction.test.ts (pooler: \'transaction\' behind a real PgBouncer)')) {
  const server = new URL(adminUrl)
  const target = { host: server.hostname, port: Number(server.port), user: decodeURIComponent(server.username), password: decodeURIComponent(server.password) }
  // Few server connections for many clients: what one transaction leaves behind is met by others.
  const bouncer = await startPgBouncer({ target, poolMode: 'transaction', poolSize: 4 })
  t.teardown(() => bouncer.stop())
  t.comment(`PgBouncer pid ${bouncer.pid} on 127.0.0.1:${bouncer.port}, pool_mode = transaction, default_pool_size = 4`)
  const db = await createDatabase(t)
  await db.admin.query(`
    CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
    CREATE SCHEMA other; CREATE TABLE other.notes (id int, body text);
    INSERT INTO other.notes VALUES (1, 'other schema');
    DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pooler_reader') THEN CREATE ROLE pooler_reader; END IF; END $$;
    GRANT USAGE ON SCHEMA other TO pooler_reader; GRANT SELECT ON other.notes TO pooler_reader`)
  const through = (test: TestDatabase): string => {
    const url = new URL(bouncer.url)
    url.pathname = `/${test.name}`
    return url.toString()
  }
  const tx = { config: { db: { transaction: true } } }

  /** An app behind PgBouncer, pooler mode on unless told otherwise. */
  async function pooledApp (options: Record<string, unknown> = {}): Promise<FastifyInstance> {
    return buildApp(db, { connectionString: through(db), env: {}, pooler: 'transaction', max: 20, ...options })
  }

  /** What a server connection carries at session level, read through the pooler. */
  const STATE = `SELECT current_setting('app.tenant', true) AS tenant, current_setting('search_path') AS path,
    current_user AS role, (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks`

  t.test('session state outside a transaction: refused with FST_REQUEST_DB_POOLER_REFUSED (500), never sent', async (t) => {
    const app = await pooledApp()
    const attempts = [
      "SET app.tenant = 'leak'",
      "SELECT set_config('app.tenant', 'leak', false)",
      'SET search_path TO other',
      'SET ROLE pooler_reader',
      'SELECT pg_advisory_lock(2101)',
      'LISTEN pooler_jobs',
      'CREATE TEMP TABLE scratch (id int)',
      'PREPARE q AS SELECT 1'
    ]
    app.get<{ Querystring: { i: string } }>('/try', async (request) => {
      await request.db.query(attempts[Number(request.query.i)])
      return 'sent'
    })
    app.get('/state', async (request) => (await request.db.query(STATE)).rows[0])
    app.get('/stream', async (request) => {
      const stream = request.db.query(new QueryStream("SELECT set_config('app.tenant', 'leak', false)"))
      return new Promise((resolve) => stream.on('error', (err: Error & { code?: string }) => resolve({ code: err.code })).resume())
    })
    app.get('/stream-in-tx', tx, async (request) => {
      const stream = request.db.query(new QueryStream("SET app.tenant = 'leak'"))
      return new Promise((resolve) => stream.on('error', (err: Error & { code?: string }) => resolve({ code: err.code, message: err.message })).resume())
    })
    app.get('/unknown-name', async (request) => {
      await request.db.query({ name: 'never_seen' } as unknown as pg.QueryConfig)
      return 'sent'
    })
    t.same((await app.inject('/stream')).json(), { code: 'FST_REQUEST_DB_POOLER_REFUSED' }, 'a stream (cursor) that sets session state: refused too')
    t.match((await app.inject('/stream-in-tx')).json(), { code: 'FST_REQUEST_DB_POOLER_REFUSED', message: /run the SET as a statement of its own/ }, 'a stream whose SET would need rewriting: refused')
    const unknown = await app.inject('/unknown-name')
    t.match(unknown.json(), { code: 'FST_REQUEST_DB_POOLER_REFUSED', message: /"never_seen" has no text/ }, 'a { name } never seen with its text: refused')
    for (let i = 0; i < attempts.length; i++) {
      const res = await app.inject(`/try?i=${i}`)
      t.equal(res.statusCode, 500, `${attempts[i]}: 500`)
      t.equal(res.json().code, 'FST_REQUEST_DB_POOLER_REFUSED', `${attempts[i]}: its code`)
    }
    // Every server connection PgBouncer has (4) is met by some of 24 requests.
    const states = await Promise.all(Array.from({ length: 24 }, async () => (await app.inject('/state')).json()))
    t.same(states.filter((s) => (s.tenant ?? '') !== '' || s.path !== '"$user", public' || s.role !== target.user || s.locks !== 0), [],
      'no server connection carries a setting, a path, a role or an advisory lock')
    const { rows } = await db.admin.query("SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'")
    t.equal(rows[0].n, 0, 'the server holds no advisory lock')
    t.equal(app.db.stats().leased, 0, 'every lease given back')
  })

  t.test('inside a route transaction or request.db.transaction: SET (as SET LOCAL), set_config(…, true), xact locks, temp ON COMMIT DROP work, and end with it', async (t) => {
    const app = await pooledApp()
    app.get('/in-route-tx', tx, async (request) => {
      await request.db.query("SET app.tenant = 'route'")
      await request.db.query('SET search_path TO other')
      await request.db.query('SET ROLE pooler_reader')
      await request.db.query('SELECT pg_advisory_xact_lock(2102)')
      await request.db.query('CREATE TEMP TABLE scratch (id int) ON COMMIT DROP')
      await request.db.query('INSERT INTO scratch VALUES (1)')
      const state = (await request.db.query(STATE)).rows[0]
      const body = (await request.db.query('SELECT body FROM notes')).rows[0].body
      return { ...state, body }
    })
    app.get('/in-transaction', async (request) => {
      const inside = await request.db.transaction(async (tx) => {
        await tx.query("SELECT set_config('app.tenant', 'fn', true)")
        return (await tx.query(STATE)).rows[0]
      })
      const after = (await request.db.query(STATE)).rows[0]
      return { inside, after }
    })
    app.get('/state', async (request) => (await request.db.query(STATE)).rows[0])
    const res = await app.inject('/in-route-tx')
    t.equal(res.statusCode, 200, res.body)
    t.match(res.json(), { tenant: 'route', path: 'other', role: 'pooler_reader', locks: 1, body: 'other schema' }, 'the request sees what it set')
    const inTx = await app.inject('/in-transaction')
    t.equal(inTx.statusCode, 200, inTx.body)
    t.equal(inTx.json().inside.tenant, 'fn', 'set_config(…, true) inside request.db.transaction')
    t.equal(inTx.json().after.tenant ?? '', '', 'gone after its COMMIT')
    const states = await Promise.all(Array.from({ length: 24 }, async () => (await app.inject('/state')).json()))
    t.same(states.filter((s) => (s.tenant ?? '') !== '' || s.path !== '"$user", public' || s.role !== target.user || s.locks !== 0), [],
      'afterwards no server connection carries any of it')
    t.equal(app.db.stats().leased, 0, 'every lease given back')
  })

  t.test('named prepared statements run unnamed: same results, no 42P05; route transactions commit and roll back', async (t) => {
    const app = await pooledApp()
    app.get<{ Querystring: { n: string } }>('/named', async (request) => {
      const n = Number(request.query.n)
      const first = await request.db.query({ name: 'pooler_double', text: 'SELECT $1::int * 2 AS doubled', values: [n] })
      const again = await request.db.query({ name: 'pooler_double', values: [n + 1] } as unknown as pg.QueryConfig)
      return { doubled: first.rows[0].doubled, again: again.rows[0].doubled }
    })
    app.post<{ Body: { body: string, fail?: boolean } }>('/notes', tx, async (request) => {
      await request.db.query('INSERT INTO notes (body) VALUES ($1)', [request.body.body])
      if (request.body.fail === true) throw new Error('handler failed')
      return 'ok'
    })
    app.get<{ Querystring: { body: string } }>('/drizzle-prepared', async (request) => {
      const orm = createDrizzle(request.db)
      const byBody = orm.select({ body: notes.body }).from(notes).where(eq(notes.body, sql.placeholder('body'))).prepare('pooler_notes_by_body')
      return { found: (await byBody.execute({ body: request.query.body })).length, again: (await byBody.execute({ body: 'kept' })).length }
    })
    const answers = await Promise.all(Array.from({ length: 60 }, (_, n) => app.inject(`/named?n=${n}`)))
    t.same(answers.map((r) => r.statusCode === 200 ? r.json() : r.body), Array.from({ length: 60 }, (_, n) => ({ doubled: n * 2, again: (n + 1) * 2 })),
      '60 concurrent requests, each running one name twice: every answer right')
    const ok = await app.inject({ method: 'POST', url: '/notes', payload: { body: 'kept' } })
    const failed = await app.inject({ method: 'POST', url: '/notes', payload: { body: 'rolled back', fail: true } })
    t.same([ok.statusCode, failed.statusCode], [200, 500])
    const { rows } = await db.admin.query("SELECT body FROM notes WHERE body IN ('kept', 'rolled back')")
    t.same(rows, [{ body: 'kept' }], 'the route transaction committed; the failed one rolled back')
    const drizzled = await Promise.all(Array.from({ length: 30 }, (_, i) => app.inject(`/drizzle-prepared?body=${i % 2 === 0 ? 'kept' : 'none'}`)))
    t.same(drizzled.map((r) => r.statusCode === 200 ? r.json() : r.body), Array.from({ length: 30 }, (_, i) => ({ found: i % 2 === 0 ? 1 : 0, again: 1 })),
      'Drizzle .prepare(name), 30 concurrent requests each executing it twice: every answer right, no 42P05')
    t.equal(app.db.stats().leased, 0, 'every lease given back')
  })

  t.test('cancel on hang-up, acquire timeout and shutdown through PgBouncer', async (t) => {
    const app = await pooledApp({ abortGraceMs: ABORT_GRACE_MS, max: 2, acquireTimeoutMs: 300, shutdownTimeoutMs: 200 })
    await addRoutes(app, db)
    app.get('/hold', async (request) => {
      await request.db.query('SELECT pg_sleep(1.5)')
      return 'held'
    })
    assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep-tx', { tries: 5, firstId: 2100 }), 'pooler=transaction, route transaction')
    const holds = [app.inject('/hold'), app.inject('/hold')]
    await waitFor(() => app.db.stats().leased === 2, 5000, 'both clients held')
    const late = await app.inject('/quick')
    t.equal(late.statusCode, 503, 'a third request waits acquireTimeoutMs, then 503')
    t.equal(late.json().code, 'FST_REQUEST_DB_ACQUIRE_TIMEOUT')
    t.same((await Promise.all(holds)).map((r) => r.statusCode), [200, 200])
    const slow = app.inject('/hold')
    await waitFor(() => app.db.stats().leased === 1, 5000, 'a request running')
    const started = Date.now()
    await app.close()
    const res = await slow
    t.equal(res.statusCode, 503, 'shutdown cancelled the statement still running after shutdownTimeoutMs')
    t.ok(Date.now() - started < 2200, `close() returned within shutdownTimeoutMs + 2 s (${Date.now() - started} ms)`)
    t.equal(app.db.stats().total, 0, 'the pool is empty')
  })

  t.test('recovery: PgBouncer restarted, and server connections killed under it', async (t) => {
    const app = await pooledApp()
    app.get('/quick', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
    app.get('/sleep', async (request) => {
      await request.db.query('SELECT pg_sleep(5)')
      return 'slept'
    })
    const okCount = async (n: number): Promise<number> => (await Promise.all(Array.from({ length: n }, () => app.inject('/quick')))).filter((r) => r.statusCode === 200).length
    t.equal(await okCount(10), 10, 'served before')
    // A statement running through PgBouncer when it goes away: that request fails, typed.
    const inFlight = app.inject('/sleep')
    await waitFor(async () => (await db.admin.query("SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%pg_sleep(5)%' AND pid <> pg_backend_pid()", [db.name])).rows.length > 0, 5000, 'the sleep to run')
    await bouncer.restart()
    const cut = await inFlight
    t.equal(cut.statusCode, 503, `the request whose statement ran through PgBouncer when it restarted: 503 (${cut.json().code})`)
    t.equal(cut.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
    // Idle clients' connections died with it; each fails its first use at most once.
    let served = 0
    const statuses: number[] = []
    for (let i = 0; i < 30; i++) {
      const res = await app.inject('/quick')
      statuses.push(res.statusCode)
      if (res.statusCode === 200) served++
    }
    t.ok(statuses.slice(-10).every((s) => s === 200), `after the restart, served again (statuses: ${statuses.join(' ')})`)
    t.ok(statuses.every((s) => s === 200 || s === 503), 'anything else was a 503, never a 500')
    t.comment(`PgBouncer restarted: ${served} of 30 requests served; the others 503`)

    // The server kills every backend of this database: idle ones under PgBouncer, and a busy one.
    const busy = app.inject('/sleep')
    await waitFor(async () => (await db.admin.query("SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%pg_sleep(5)%' AND pid <> pg_backend_pid()", [db.name])).rows.length > 0, 5000, 'the sleep to run')
    await db.admin.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> 'test-admin'", [db.name])
    const killed = await busy
    t.equal(killed.statusCode, 503, `the request whose statement ran: 503 (${killed.json().code})`)
    const after: number[] = []
    for (let i = 0; i < 20; i++) after.push((await app.inject('/quick')).statusCode)
    t.ok(after.slice(-10).every((s) => s === 200), `later requests served (statuses: ${after.join(' ')})`)
    await waitFor(() => app.db.stats().leased === 0, 3000, 'every lease given back')
  })

  t.test('200 concurrent interleaved requests, some trying to set session state: none sees another\'s', async (t) => {
    // Each run its own setting: what the run without the option leaves on PgBouncer's server
    // connections stays there (nobody resets them), and must not count against the other.
    const run = async (pooler: 'none' | 'transaction', setting: string): Promise<{ foreign: number, refused: number, served: number, statuses: Record<number, number> }> => {
      const app = await pooledApp({ pooler, max: 50 })
      // Three kinds, interleaved: a session SET outside any transaction (refused with the option on),
      // the same inside a route transaction (SET LOCAL then), and a plain read of the setting.
      app.get<{ Querystring: { i: string } }>('/set-outside', async (request) => {
        const me = request.query.i
        await request.db.query(`SELECT set_config('${setting}', '${me}', false)`)
        await request.db.query('SELECT pg_sleep(0.005)')
        return { me, seen: (await request.db.query('SELECT current_setting($1, true) AS v', [setting])).rows[0].v }
      })
      app.get<{ Querystring: { i: string } }>('/set-inside', tx, async (request) => {
        const me = request.query.i
        await request.db.query(`SET ${setting} = '${me}'`)
        await request.db.query('SELECT pg_sleep(0.005)')
        return { me, seen: (await request.db.query('SELECT current_setting($1, true) AS v', [setting])).rows[0].v }
      })
      app.get('/read', async (request) => {
        await request.db.query('SELECT pg_sleep(0.002)')
        return { me: null, seen: (await request.db.query('SELECT current_setting($1, true) AS v', [setting])).rows[0].v }
      })
      const paths = ['/set-outside', '/set-inside', '/read']
      const answers = await Promise.all(Array.from({ length: 200 }, (_, i) => app.inject(`${paths[i % 3]}?i=${i}`)))
      const statuses: Record<number, number> = {}
      let foreign = 0
      let refused = 0
      for (const res of answers) {
        statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1
        if (res.statusCode !== 200) {
          if (res.json().code === 'FST_REQUEST_DB_POOLER_REFUSED') refused++
          continue
        }
        const { me, seen } = res.json()
        if ((seen ?? '') !== '' && seen !== me) foreign++
      }
      await waitFor(() => app.db.stats().leased === 0, 3000, 'every lease given back')
      await app.close()
      return { foreign, refused, served: statuses[200] ?? 0, statuses }
    }
    const withIt = await run('transaction', 'app.with_pooler')
    const without = await run('none', 'app.without_pooler')
    t.comment(`pooler: 'none' behind PgBouncer (for comparison): ${without.foreign} of ${without.served} served requests observed another request's state`)
    t.equal(withIt.foreign, 0, `pooler: 'transaction': 0 of ${withIt.served} served requests observed another request's state`)
    t.equal(withIt.refused, 67, 'the 67 that set session state outside a transaction were refused')
    t.same(withIt.statuses, { 200: 133, 500: 67 }, 'every other request served')
  })

  t.test('PgBouncer still up at the end', async (t) => {
    t.ok(bouncer.running(), `pid ${bouncer.pid}`)
    const client = new pg.Client(through(db))
    await client.connect()
    t.same((await client.query('SELECT 1 AS one')).rows, [{ one: 1 }])
    await client.end()
  })
}
