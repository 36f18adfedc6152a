// Whichever way a request ends, its client goes back exactly once, and in a state the next request
// can trust: no open transaction, no session settings, no broken connection.
import { Readable } from 'node:stream'
import t from 'tap'
import requestDb from '../lib/index.js'
import Fastify from 'fastify'
import { appBackends, buildApp, countingPool, createDatabase, waitFor } from './helpers/db.js'
import { get, listen } from './helpers/http.js'

t.test('released exactly once: response, throw, onSend error, double send, failing stream', async (t) => {
  const db = await createDatabase(t)
  const { pool, counts } = countingPool(db.url)
  t.teardown(() => pool.end())
  const app = Fastify({ logger: false })
  t.teardown(() => app.close())
  await app.register(requestDb, { pool, env: {} })
  app.get('/ok', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  app.get('/throw', async (request) => {
    await request.db.query('SELECT 1')
    throw new Error('handler failed')
  })
  app.get('/on-send-throws', {
    onSend: async () => { throw new Error('onSend failed') }
  }, async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  app.get('/serializer-throws', {
    schema: { response: { 200: { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'] } } }
  }, async (request) => {
    await request.db.query('SELECT 1')
    return { n: 'not a number' }
  })
  app.get('/send-twice', async (request, reply) => {
    await request.db.query('SELECT 1')
    reply.send('first')
    reply.send('second')
    return reply
  })
  app.get('/stream-fails', async (request, reply) => {
    await request.db.query('SELECT 1')
    let sent = 0
    const stream = new Readable({
      read () {
        if (sent++ === 0) this.push('half of it')
        else this.destroy(new Error('stream broke'))
      }
    })
    return reply.type('text/plain').send(stream)
  })
  await app.ready()
  const base = { ...counts }

  t.equal((await app.inject('/ok')).statusCode, 200)
  t.equal((await app.inject('/throw')).statusCode, 500)
  t.equal((await app.inject('/on-send-throws')).statusCode, 500)
  t.equal((await app.inject('/serializer-throws')).statusCode, 500)
  t.equal((await app.inject('/send-twice')).body, 'first')
  const streamed = await app.inject('/stream-fails').then((r) => r.statusCode, () => 'aborted')
  t.ok(streamed === 200 || streamed === 'aborted', 'the stream ends somehow')

  await waitFor(() => app.db.stats().leased === 0, 3000, 'all released')
  t.equal(counts.acquired - base.acquired, 6, 'one checkout per request')
  t.equal(counts.released - base.released, 6, 'one release per checkout')
  t.equal(counts.doubleReleases, 0, 'never released twice')
})

t.test('a transaction the handler left open is rolled back, never committed or carried over', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE notes (body text)')
  const app = await buildApp(db, { max: 1 })
  app.post('/left-open', async (request) => {
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('uncommitted')")
    return 'forgot to commit'
  })
  app.post('/left-open-throws', async (request) => {
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('uncommitted 2')")
    throw new Error('boom')
  })
  app.get('/state', async (request) => {
    const { rows } = await request.db.query("SELECT pg_backend_pid() AS pid, now() = statement_timestamp() AS fresh_tx, (SELECT count(*)::int FROM notes) AS notes")
    return rows[0]
  })
  const first = await app.inject({ method: 'POST', url: '/left-open' })
  t.equal(first.statusCode, 200)
  const after = (await app.inject('/state')).json()
  t.equal(after.fresh_tx, true, 'the next request is not inside the old transaction')
  t.equal(after.notes, 0, 'the insert was rolled back')
  t.equal((await app.inject({ method: 'POST', url: '/left-open-throws' })).statusCode, 500)
  const again = (await app.inject('/state')).json()
  t.equal(again.pid, after.pid, 'the same connection was reused (rolled back, not thrown away)')
  t.equal(again.notes, 0)
  t.same((await db.admin.query('SELECT count(*)::int AS n FROM notes')).rows[0], { n: 0 })
})

t.test('session state does not leak into a later request on the same connection', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query(`DO $$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'request_db_reader') THEN CREATE ROLE request_db_reader; END IF;
    END $$`)
  await db.admin.query('CREATE SCHEMA other')
  const app = await buildApp(db, { max: 1 })
  const changes: Record<string, string> = {
    'set-search-path': 'SET search_path TO other',
    'set-role': 'SET ROLE request_db_reader',
    'set-config': "SELECT set_config('app.tenant', 'acme', false)",
    'set-with-comment': "/* tenant */ SET application_name = 'leaky'",
    'multi-statement': "SELECT 1; SET statement_timeout = '1234'"
  }
  for (const [name, sql] of Object.entries(changes)) {
    app.post(`/${name}`, async (request) => {
      await request.db.query(sql)
      return 'changed'
    })
  }
  app.get('/observe', async (request) => {
    const { rows } = await request.db.query(`SELECT current_setting('search_path') AS search_path, current_user AS role,
      current_setting('app.tenant', true) AS tenant, current_setting('application_name') AS app_name,
      current_setting('statement_timeout') AS statement_timeout`)
    return rows[0]
  })
  const baseline = (await app.inject('/observe')).json()
  for (const name of Object.keys(changes)) {
    t.equal((await app.inject({ method: 'POST', url: `/${name}` })).body, 'changed', name)
    const seen = (await app.inject('/observe')).json()
    t.same({ ...seen, tenant: seen.tenant || '' }, { ...baseline, tenant: baseline.tenant || '' }, `${name}: nothing visible to the next request`)
  }
  t.equal(baseline.role, 'postgres')
})

t.test('DEALLOCATE in a request: its connection is not reused, so no prepared statement is looked for where it is gone', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1 })
  // pg prepares a named statement once per connection and from then on sends only its Bind.
  app.get('/named', async (request) => (await request.db.query({ name: 'request_db_named', text: 'SELECT pg_backend_pid() AS pid' })).rows[0])
  app.post('/deallocate', async (request) => {
    await request.db.query('DEALLOCATE ALL')
    return 'dropped'
  })
  const before = await app.inject('/named')
  t.equal(before.statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/deallocate' })).body, 'dropped')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
  const after = await app.inject('/named')
  t.equal(after.statusCode, 200, `the named statement runs again (${after.body})`)
  t.not(after.json().pid, before.json().pid, 'on a new connection')
})

t.test('a request that changed nothing costs no extra statement: its connection is reused as is', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1 })
  app.get('/', async (request) => (await request.db.query("SELECT pg_backend_pid() AS pid, 'marker-query' AS m")).rows[0])
  const a = (await app.inject('/')).json()
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
  const backends = await appBackends(db)
  t.equal(backends.length, 1)
  t.match(backends[0].query, /marker-query/, 'the last statement on the connection is the request\'s own: no reset, no ROLLBACK')
  const b = (await app.inject('/')).json()
  t.equal(b.pid, a.pid, 'same connection')
})

t.test('SET LOCAL inside a transaction keeps the connection', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1 })
  app.get('/', async (request) => request.db.transaction(async (tx) => {
    await tx.query("SET LOCAL search_path TO pg_catalog")
    await tx.query("SELECT set_config('app.x', 'y', true)")
    return (await tx.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
  }))
  const a = (await app.inject('/')).json()
  const b = (await app.inject('/')).json()
  t.equal(a, b, 'transaction-scoped settings do not cost a reconnect')
})

t.test('a connection that broke is destroyed, not returned; the next request gets a working one', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 2 })
  app.get('/suicide', async (request) => {
    await request.db.query('SELECT pg_terminate_backend(pg_backend_pid())')
    return 'unreachable'
  })
  app.get('/pid', async (request) => (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid)
  const res = await app.inject('/suicide')
  t.equal(res.statusCode, 503)
  t.equal(res.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
  t.equal(res.headers['retry-after'], '1')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
  for (let i = 0; i < 4; i++) t.equal((await app.inject('/pid')).statusCode, 200, `request ${i} after the break works`)
})

t.test('backends killed while idle in the pool or idle inside a lease do not crash the app', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 3 })
  let killLeased: (() => Promise<void>) | null = null
  app.get('/leased-idle', async (request) => {
    const { rows } = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    await db.admin.query('SELECT pg_terminate_backend($1)', [rows[0].pid])
    // Let the termination arrive while the lease holds the client between statements.
    await new Promise((resolve) => setTimeout(resolve, 200))
    const again = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    return { first: rows[0].pid, second: again.rows[0].pid }
  })
  app.get('/pid', async (request) => (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid)
  void killLeased
  await app.ready()
  await Promise.all([app.inject('/pid'), app.inject('/pid'), app.inject('/pid')])
  await waitFor(async () => (await appBackends(db)).length > 0, 2000, 'idle clients')
  await db.admin.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> 'test-admin'`, [db.name])
  await waitFor(() => app.db.stats().total === 0, 3000, 'pool drops the dead idle clients')
  t.equal((await app.inject('/pid')).statusCode, 200, 'still serving after idle clients were killed')

  const res = await app.inject('/leased-idle')
  t.equal(res.statusCode, 200, res.body)
  t.not(res.json().first, res.json().second, 'a fresh connection replaced the dead one')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('a streamed reply keeps its client until the stream is done, then gives it back', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 2 })
  app.get('/rows', async (request, reply) => {
    let n = 0
    // Reads from the database while the response is being written (what a cursor stream does).
    const stream = new Readable({
      read () {
        if (n === 3) { this.push(null); return }
        request.db.query<{ n: number }>('SELECT $1::int AS n', [n++]).then(
          ({ rows }) => this.push(`${rows[0].n}\n`),
          (err: Error) => this.destroy(err))
      }
    })
    return reply.type('text/plain').send(stream)
  })
  const res = await app.inject('/rows')
  t.equal(res.statusCode, 200)
  t.equal(res.body, '0\n1\n2\n', 'queries after onSend worked: the client was not given back early')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'released when the response closed')
})

t.test('ended without onSend or before its query: a hijacked reply and a query not waited for each release once', async (t) => {
  const db = await createDatabase(t)
  const { pool, counts } = countingPool(db.url)
  db.closeFirst.push(() => pool.end())
  const app = await buildApp(db, { pool, env: {} })
  app.get('/hijacked', async (request, reply) => {
    // Fastify runs no onSend for a hijacked reply: only the sweep of held clients sees it end.
    reply.hijack()
    const { rows } = await request.db.query('SELECT 1 AS one')
    reply.raw.end(JSON.stringify(rows[0]))
  })
  let lateQuery: Promise<unknown> = Promise.resolve()
  app.get('/not-awaited', async (request) => {
    lateQuery = request.db.query('SELECT pg_sleep(0.1)').then(() => 'ran', (err: { code?: string }) => err.code)
    return 'early'
  })
  await app.ready()
  const base = { ...counts }

  t.equal((await app.inject('/hijacked')).body, '{"one":1}')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'the hijacked request to give its client back')
  t.equal((await app.inject('/not-awaited')).body, 'early')
  t.match(await lateQuery, /^(ran|FST_REQUEST_DB_RELEASED)$/, 'the late query ran to its end or was refused, never cut off')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'the late query\'s client to go back')
  t.equal(counts.released - base.released, counts.acquired - base.acquired, 'one release per checkout')
  t.equal(counts.destroyed - base.destroyed, 0, 'both connections reused, not closed')
  t.equal(counts.doubleReleases, 0, 'never released twice')
})

t.test('a request that used the database leaves no listener on its response: hang-ups are found by the sweep', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db)
  const listeners = new Map<string, number>()
  app.addHook('onResponse', async (request, reply) => {
    listeners.set(request.url, reply.raw.listenerCount('close'))
  })
  app.get('/no-db', async () => ({ one: 1 }))
  app.get('/db', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  const port = await listen(app)
  for (const path of ['/no-db', '/db']) t.equal((await get(port, path)).status, 200)
  t.equal(listeners.get('/db'), listeners.get('/no-db'), `'close' listeners: ${listeners.get('/db')} with a query, ${listeners.get('/no-db')} without`)
})
