// A request's database identity (#17): the `context` option applies settings and a role as the
// first thing in the request's transaction, transaction-local, in BEGIN's round trip; policies see
// them, nothing outlives the request, and statements that would change them are refused.
import type { FastifyInstance, FastifyRequest } from 'fastify'
import pg from 'pg'
import QueryStream from 'pg-query-stream'
import t from 'tap'
import type { DbContext, DbContextFunction, RequestDbOptions } from '../lib/index.js'
import requestKysely from '../lib/integrations/kysely.js'
import { buildApp, countingPool, createDatabase, poolWatchingStatements, type TestDatabase, waitFor } from './helpers/db.js'
import { ndjson } from './helpers/streams.js'
import { pipeline } from 'node:stream'
import { createTenantSchema } from './helpers/rls.js'

const db = await createDatabase(t)
const { role } = await createTenantSchema(db)
await db.admin.query(`INSERT INTO notes (tenant, body) VALUES ('a', 'a-1'), ('a', 'a-2'), ('b', 'b-1')`)

const tenantOf = (request: FastifyRequest): string => String(request.headers['x-tenant'] ?? '')
const context: DbContextFunction = (request) => ({ settings: { 'app.tenant_id': tenantOf(request), 'app.user_id': 7 }, role })

async function contextApp (options: RequestDbOptions = {}): Promise<FastifyInstance> {
  return buildApp(db, { context, contextRoles: [role], ...options })
}

const WHO = "SELECT current_user AS who, current_setting('app.tenant_id', true) AS tenant, current_setting('app.user_id', true) AS user_id, now() <> statement_timestamp() AS in_tx"

async function settled (t: { teardown (fn: () => unknown): void }, app: FastifyInstance): Promise<void> {
  await waitFor(() => app.db.stats().leased === 0, 3000, 'every client back')
}

t.test('the context is applied inside a transaction: policies see only the tenant, writes are checked', async (t) => {
  const app = await contextApp()
  app.get('/who', async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/notes', async (request) => (await request.db.query('SELECT body FROM notes ORDER BY body')).rows.map((r) => r.body))
  app.post('/notes/:tenant', async (request) => {
    const tenant = (request.params as { tenant: string }).tenant
    return (await request.db.query('INSERT INTO notes (tenant, body) VALUES ($1, $2) RETURNING id', [tenant, `${tenant}-new`])).rows[0]
  })

  const who = (await app.inject({ url: '/who', headers: { 'x-tenant': 'a' } })).json()
  t.same(who, { who: role, tenant: 'a', user_id: '7', in_tx: true }, 'role, settings (a number sent as text), inside a transaction')
  t.same((await app.inject({ url: '/notes', headers: { 'x-tenant': 'a' } })).json(), ['a-1', 'a-2'])
  t.same((await app.inject({ url: '/notes', headers: { 'x-tenant': 'b' } })).json(), ['b-1'])
  t.same((await app.inject({ url: '/notes', headers: { 'x-tenant': 'nobody' } })).json(), [])

  t.equal((await app.inject({ method: 'POST', url: '/notes/b', headers: { 'x-tenant': 'b' } })).statusCode, 200)
  const foreign = await app.inject({ method: 'POST', url: '/notes/a', headers: { 'x-tenant': 'b' } })
  t.equal(foreign.statusCode, 500, 'a write into another tenant fails the policy check')
  t.match(foreign.json().message, /row-level security/)
  t.same((await db.admin.query("SELECT tenant FROM notes WHERE body LIKE '%-new'")).rows, [{ tenant: 'b' }], 'committed: only the own tenant’s write')
  await db.admin.query("DELETE FROM notes WHERE body LIKE '%-new'")
  await settled(t, app)
})

t.test('one round trip for BEGIN and the context: as many as a plain route transaction', async (t) => {
  // Count the server's ReadyForQuery messages: one per round trip.
  const pool = new pg.Pool({ connectionString: db.url, max: 1 })
  let trips = 0
  pool.on('connect', (client) => {
    (client as unknown as { connection: { on (e: string, fn: () => void): void } }).connection.on('readyForQuery', () => { trips++ })
  })
  t.teardown(() => pool.end())
  const app = await contextApp({ pool })
  app.get('/context', async (request) => (await request.db.query('SELECT count(*)::int AS n FROM notes')).rows[0])
  app.get('/plain-tx', { config: { db: { transaction: true, context: false } } }, async (request) => (await request.db.query('SELECT count(*)::int AS n FROM notes')).rows[0])
  await app.ready()
  const tripsOf = async (url: string): Promise<[number, number]> => {
    const before = trips
    const n = (await app.inject({ url, headers: { 'x-tenant': 'a' } })).json().n
    return [trips - before, n]
  }
  const plain = await tripsOf('/plain-tx')
  const withContext = await tripsOf('/context')
  t.equal(plain[0], 3, 'a plain route transaction: BEGIN, the statement, COMMIT')
  t.equal(withContext[0], 3, 'with a context (two settings and a role): the same three')
  t.equal(plain[1], 3, 'context: false on the route: no role, the superuser sees every row')
  t.equal(withContext[1], 2, 'the context applied: the tenant’s rows only')
  await settled(t, app)
})

t.test('BEGIN and the context statement are prepared once per connection; dropped from outside the plugin, they are prepared again', async (t) => {
  // One connection: the pool's direct users (DEALLOCATE, DISCARD ALL) run on the connection the
  // plugin prepared its statement on, out of the session-state check's sight.
  const pool = new pg.Pool({ connectionString: db.url, max: 1 })
  t.teardown(() => pool.end())
  const PREPARED = "SELECT coalesce(array_agg(name ORDER BY name), '{}') AS names FROM pg_prepared_statements WHERE name LIKE 'fastify_request_db%'"
  const app = await contextApp({ pool })
  app.get('/who', async (request) => {
    const who = (await request.db.query(WHO)).rows[0]
    const { names } = (await request.db.query(PREPARED)).rows[0]
    const { pid } = (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0]
    return { ...who, names, pid }
  })
  const ask = async (tenant: string): Promise<Record<string, unknown>> => {
    const res = await app.inject({ url: '/who', headers: { 'x-tenant': tenant } })
    t.equal(res.statusCode, 200, `tenant ${tenant}: answered`)
    return res.json()
  }
  const names = ['fastify_request_db_begin', 'fastify_request_db_context_2_role']
  const first = await ask('a')
  t.match(first, { who: role, tenant: 'a', user_id: '7', in_tx: true, names }, 'prepared on first use')
  const second = await ask('b')
  t.match(second, { who: role, tenant: 'b', in_tx: true, names, pid: first.pid }, 'the same statement, bound again, on the same connection')
  await settled(t, app)

  await pool.query('DEALLOCATE ALL')
  t.match(await ask('a'), { who: role, tenant: 'a', in_tx: true, names, pid: first.pid }, 'after DEALLOCATE ALL: rolled back, prepared again, on the same connection')
  await settled(t, app)
  await pool.query('DEALLOCATE fastify_request_db_context_2_role')
  t.match(await ask('b'), { who: role, tenant: 'b', in_tx: true, names, pid: first.pid }, 'after a DEALLOCATE of the context statement alone: the same')
  await settled(t, app)
  // BEGIN's own Bind fails: no transaction is open when the batch fails.
  await pool.query('DEALLOCATE fastify_request_db_begin')
  t.match(await ask('a'), { who: role, tenant: 'a', in_tx: true, names, pid: first.pid }, 'after a DEALLOCATE of BEGIN alone: the same')
  await settled(t, app)

  await pool.query('DISCARD ALL')
  const inside = await app.db.withContext({ settings: { 'app.tenant_id': 'b' }, role }, async (tx) => ({ ...(await tx.query(WHO)).rows[0], ...(await tx.query(PREPARED)).rows[0] }))
  t.match(inside, { who: role, tenant: 'b', in_tx: true, names: ['fastify_request_db_begin', 'fastify_request_db_context_1_role'] }, 'app.db.withContext after DISCARD ALL: the same')
  t.same((await ask('b')).names, ['fastify_request_db_begin', 'fastify_request_db_context_1_role', 'fastify_request_db_context_2_role'],
    'one context statement per shape (settings, role), each prepared again where it was missing')
  await settled(t, app)
  t.equal((await pool.query(WHO)).rows[0].tenant || '', '', 'nothing left on the connection')
})

t.test('a statement issued while the context batch is on the wire waits for it, and never runs without the context', async (t) => {
  // After DEALLOCATE ALL the batch's first message, BEGIN's Bind, fails: no transaction is open.
  // A statement pg had queued behind the batch would run next, in autocommit, as the login role;
  // the request's statements wait for the batch's answer instead (Session.opening), and run once
  // it was sent again.
  let issueDuring: FastifyRequest | null = null
  let during: Promise<unknown> = Promise.resolve('not issued')
  const sent: string[] = []
  const pool = poolWatchingStatements(t, db.url, (text) => {
    sent.push(text)
    const request = issueDuring
    if (request !== null && text.startsWith('BEGIN; SELECT')) {
      issueDuring = null
      during = request.db.query(WHO).then((r) => r.rows[0], (err: Error & { code?: string }) => err.code)
    }
  })
  const app = await contextApp({ pool })
  app.get('/race', async (request) => {
    issueDuring = request
    const first = (await request.db.query(WHO)).rows[0]
    return { first, during: await during }
  })
  app.get('/who', async (request) => (await request.db.query(WHO)).rows[0])
  t.match((await app.inject({ url: '/who', headers: { 'x-tenant': 'a' } })).json(), { who: role }, 'prepared')
  await settled(t, app)
  await pool.query('DEALLOCATE ALL')
  sent.length = 0
  const res = await app.inject({ url: '/race', headers: { 'x-tenant': 'b' } })
  t.equal(res.statusCode, 200, res.body)
  t.match(res.json().first, { who: role, tenant: 'b', in_tx: true }, 'the request goes on in its context (the batch sent again)')
  t.match(res.json().during, { who: role, tenant: 'b', in_tx: true }, 'the statement issued during the failed batch ran after it was sent again, in the context')
  t.same(sent.slice(0, 3).map((text) => text.startsWith('BEGIN; SELECT') ? 'batch' : text), ['batch', 'ROLLBACK', 'batch'],
    'nothing was handed to pg between the failed batch and its second sending')
  await settled(t, app)
})

t.test('a request that ends while its failed context batch is answered leaves no retry on the connection it gave back', async (t) => {
  // After DEALLOCATE ALL the batch fails (BEGIN's Bind: no transaction open). The handler did not
  // wait for its statement, so the response is over and the lease gives the clean connection back
  // as soon as the batch is answered; the retry (ROLLBACK, the batch again) must not follow it
  // there, where it would open a transaction in this request's tenant and role for whoever takes
  // the connection next.
  let batchSent: (() => void) | null = null
  const pool = poolWatchingStatements(t, db.url, (text) => {
    if (batchSent !== null && text.startsWith('BEGIN; SELECT')) batchSent()
  })
  const app = await contextApp({ pool })
  app.get('/who', async (request) => (await request.db.query(WHO)).rows[0])
  let during: Promise<unknown> = Promise.resolve('not issued')
  app.get('/unawaited', async (request) => {
    // Answers as soon as the batch is on the wire, without waiting for its statement.
    const sent = new Promise<void>((resolve) => { batchSent = resolve })
    during = request.db.query(WHO).then((r) => r.rows[0], (err: Error & { code?: string }) => err.code)
    await sent
    batchSent = null
    return 'answered before its statement'
  })
  app.get('/plain', { config: { db: { context: false } } }, async (request) => (await request.db.query(WHO)).rows[0])
  t.match((await app.inject({ url: '/who', headers: { 'x-tenant': 'a' } })).json(), { who: role }, 'prepared')
  await settled(t, app)
  await pool.query('DEALLOCATE ALL')
  t.equal((await app.inject({ url: '/unawaited', headers: { 'x-tenant': 'b' } })).statusCode, 200)
  t.equal(await during, 'FST_REQUEST_DB_RELEASED', 'its statement, issued during the batch, was refused: the request was over')
  await settled(t, app)
  await new Promise((resolve) => setTimeout(resolve, 100))
  const next = (await app.inject({ url: '/plain' })).json()
  t.not(next.who, role, 'the next request on the connection runs as the login role')
  t.ok(next.tenant === null || next.tenant === '', `no tenant (got ${JSON.stringify(next.tenant)})`)
  t.equal(next.in_tx, false, 'and in no transaction left open by the request before')
  await settled(t, app)
})

t.test("behind a transaction pooler (pooler: 'transaction'): nothing prepared, the context applied all the same", async (t) => {
  const pool = new pg.Pool({ connectionString: db.url, max: 1 })
  t.teardown(() => pool.end())
  const app = await contextApp({ pool, pooler: 'transaction' })
  app.get('/who', async (request) => ({
    ...(await request.db.query(WHO)).rows[0],
    prepared: (await request.db.query('SELECT count(*)::int AS n FROM pg_prepared_statements')).rows[0].n
  }))
  for (const tenant of ['a', 'b']) {
    t.match((await app.inject({ url: '/who', headers: { 'x-tenant': tenant } })).json(), { who: role, tenant, in_tx: true, prepared: 0 }, `tenant ${tenant}`)
  }
  await settled(t, app)
})

t.test('nothing outlives the request: the next request on the connection has no role and no settings', async (t) => {
  const app = await contextApp({ max: 1 })
  app.get('/who', async (request) => ({ ...(await request.db.query(WHO)).rows[0], pid: (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid }))
  app.get('/plain', { config: { db: { context: false } } }, async (request) =>
    ({ ...(await request.db.query(WHO)).rows[0], pid: (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid }))
  app.get('/throws', async (request) => {
    await request.db.query('SELECT 1')
    throw new Error('handler failed')
  })
  const first = (await app.inject({ url: '/who', headers: { 'x-tenant': 'a' } })).json()
  t.equal((await app.inject({ url: '/throws', headers: { 'x-tenant': 'a' } })).statusCode, 500)
  const next = (await app.inject({ url: '/plain' })).json()
  t.equal(next.pid, first.pid, 'the same connection, reused (nothing session-level was changed)')
  t.not(next.who, role, 'the login role again')
  t.ok(next.tenant === null || next.tenant === '', `no tenant left behind (got ${JSON.stringify(next.tenant)})`)
  t.ok(next.user_id === null || next.user_id === '', 'no user left behind')
  t.equal(next.in_tx, false, 'a request without a context runs no transaction of its own')
  await settled(t, app)
})

t.test('a context function that throws or rejects: a typed error with its cause, its 4xx kept, no statement', async (t) => {
  const { pool, counts } = countingPool(db.url, 2)
  t.teardown(() => pool.end())
  const unauthorized = Object.assign(new Error('bad token'), { statusCode: 401 })
  const app = await buildApp(db, {
    pool,
    contextRoles: [role],
    context: (request) => {
      if (request.url === '/sync-throw') throw new Error('sync failure')
      // eslint-disable-next-line no-throw-literal
      if (request.url === '/throw-string') throw 'not an Error'
      if (request.url === '/reject') return Promise.reject(unauthorized)
      return { role }
    }
  })
  let caught: unknown = null
  let secondUse: unknown = null
  const handler = async (request: FastifyRequest): Promise<unknown> => {
    try {
      await request.db.query('SELECT 1')
    } catch (err) {
      caught = err
      // The request never goes on without its context: a second try fails the same way.
      secondUse = await request.db.query('SELECT 1').then(() => 'ran', (e: Error & { code?: string }) => e.code)
      throw err
    }
    return 'ran'
  }
  app.get('/sync-throw', handler)
  app.get('/reject', handler)
  app.get('/throw-string', handler)
  await app.ready()
  const before = counts.acquired
  const sync = await app.inject('/sync-throw')
  t.equal(sync.statusCode, 500)
  t.equal(sync.json().code, 'FST_REQUEST_DB_CONTEXT_FAILED')
  t.match(sync.json().message, /could not be resolved: sync failure/)
  t.equal(secondUse, 'FST_REQUEST_DB_CONTEXT_FAILED')
  const rejected = await app.inject('/reject')
  t.equal(rejected.statusCode, 401, "the thrown error's 4xx is kept")
  t.equal(rejected.json().code, 'FST_REQUEST_DB_CONTEXT_FAILED')
  t.equal((caught as Error).cause, unauthorized, 'the thrown error is the cause')
  t.match((await app.inject('/throw-string')).json(), { statusCode: 500, code: 'FST_REQUEST_DB_CONTEXT_FAILED', message: /resolved: not an Error$/ })
  t.equal(counts.acquired - before, 0, 'no client was taken, so no statement ran')
})

t.test('a context that is not one: FST_REQUEST_DB_INVALID_CONTEXT naming what is wrong, never a value, no statement', async (t) => {
  const { pool, counts } = countingPool(db.url, 2)
  t.teardown(() => pool.end())
  const cases: Array<[string, unknown, RegExp]> = [
    ['undefined', undefined, /returned undefined; return null/],
    ['a string', 'tenant-a', /expected \{ settings, role \} or null, got a string/],
    ['an unknown key', { tenant: 'a' }, /unknown key "tenant"/],
    ['a bare setting name', { settings: { tenant_id: 'a' } }, /setting name "tenant_id" is not a custom setting name/],
    ['the role as a setting', { settings: { role: 'postgres' } }, /setting name "role" is not/],
    ['an object as a value', { settings: { 'app.tenant_id': { id: 'secret-value' } } }, /the value of app\.tenant_id is an object/],
    ['NaN as a value', { settings: { 'app.tenant_id': Number.NaN } }, /the value of app\.tenant_id is NaN/],
    ['NUL in a value', { settings: { 'app.tenant_id': 'a\0b' } }, /contains a NUL character/],
    ['one name twice', { settings: { 'app.tenant_id': 'a', 'APP.TENANT_ID': 'b' } }, /given twice/],
    ['a role outside contextRoles', { role: 'postgres' }, /role "postgres" is not in contextRoles/],
    ['a role of the wrong type', { role: 42 }, /role must be a string, got a number/],
    ['settings as an array', { settings: ['app.tenant_id'] }, /settings must be an object of name: value, got an array/],
    ['null as a value', { settings: { 'app.tenant_id': null } }, /the value of app\.tenant_id is null/]
  ]
  const app = await buildApp(db, { pool, contextRoles: [role], context: (request) => cases[Number((request.query as { i: string }).i)][1] as DbContext })
  app.get('/', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  await app.ready()
  const before = counts.acquired
  for (const [i, [name, , message]] of cases.entries()) {
    const res = await app.inject(`/?i=${i}`)
    t.equal(res.statusCode, 500, `${name}: 500`)
    t.equal(res.json().code, 'FST_REQUEST_DB_INVALID_CONTEXT', `${name}: code`)
    t.match(res.json().message, message, `${name}: says what is wrong`)
    t.notMatch(res.body, /secret-value/, `${name}: the value is not echoed`)
  }
  t.equal(counts.acquired - before, 0, 'no client was taken')
})

t.test('per route: config.db.context overrides the app’s function, false opts out; null means no context', async (t) => {
  const app = await contextApp()
  app.get('/app', async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/own', { config: { db: { context: () => ({ settings: { 'app.tenant_id': 'b' }, role }) } } }, async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/none', { config: { db: { context: false } } }, async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/null', { config: { db: { context: () => null } } }, async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/bad', { config: { db: { context: 'yes' as never } } }, async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/role-only', { config: { db: { context: () => ({ role }) } } }, async (request) => (await request.db.query(WHO)).rows[0])
  app.get('/settings-only', { config: { db: { context: async () => ({ settings: { 'app.tenant_id': 'c', 'app.flag': true } }) } } },
    async (request) => ({ ...(await request.db.query(WHO)).rows[0], flag: (await request.db.query("SELECT current_setting('app.flag') AS f")).rows[0].f }))
  app.get('/empty', { config: { db: { context: () => ({}) } } }, async (request) => ({
    ...(await request.db.query(WHO)).rows[0],
    refused: await request.db.query('RESET ROLE').then(() => 'ran', (err: Error & { code?: string }) => err.code)
  }))
  t.match((await app.inject({ url: '/app', headers: { 'x-tenant': 'a' } })).json(), { who: role, tenant: 'a' })
  t.match((await app.inject({ url: '/own', headers: { 'x-tenant': 'a' } })).json(), { who: role, tenant: 'b', user_id: /^$/ }, 'the route’s own function (which sets no user)')
  const none = (await app.inject({ url: '/none', headers: { 'x-tenant': 'a' } })).json()
  t.not(none.who, role)
  t.equal(none.in_tx, false, 'context: false, no transaction either')
  t.not((await app.inject('/null')).json().who, role, 'null: no context for this request')
  t.match((await app.inject('/role-only')).json(), { who: role, in_tx: true }, 'a role alone')
  const settingsOnly = (await app.inject('/settings-only')).json()
  t.match(settingsOnly, { tenant: 'c', flag: 'true', in_tx: true }, 'settings alone (a boolean sent as text), async')
  t.not(settingsOnly.who, role, 'no role: the login role')
  const empty = (await app.inject('/empty')).json()
  t.match(empty, { in_tx: true, refused: 'FST_REQUEST_DB_CONTEXT_STATEMENT' }, 'an empty context: a transaction, and the role can\'t be changed')
  const bad = await app.inject('/bad')
  t.equal(bad.statusCode, 500)
  t.match(bad.json(), { code: 'FST_REQUEST_DB_INVALID_CONTEXT', message: /must be a function or false, got a string/ })
  await settled(t, app)
})

t.test('statements that would change the identity are refused before they are sent; the context stays', async (t) => {
  const app = await contextApp()
  const refused = [
    `SET ROLE ${role}`, 'RESET ROLE', 'set role none', 'SET LOCAL ROLE postgres', 'SET SESSION ROLE postgres',
    'SET SESSION AUTHORIZATION DEFAULT', 'RESET SESSION AUTHORIZATION', 'RESET ALL', 'SELECT 1; RESET ROLE',
    "SELECT set_config('role', 'postgres', true)", "SELECT pg_catalog.set_config( 'ROLE' , 'postgres', false)",
    "SET app.tenant_id = 'b'", "SET LOCAL app.tenant_id TO 'b'", 'RESET app.tenant_id', 'set local "app"."tenant_id" = \'b\'',
    "SELECT set_config('app.tenant_id', 'b', true)", "SELECT set_config('APP.USER_ID', '1', true)",
    "SELECT set_config($1, 'b', true)", "DO $$ BEGIN RESET ROLE; END $$", "/* note */ SET ROLE postgres"
  ]
  const allowed = [
    "SET LOCAL statement_timeout = '5s'", "SELECT set_config('app.other', 'x', true)", "UPDATE notes SET body = body WHERE false",
    "SELECT 'set role' AS text"
  ]
  app.post('/try', async (request) => {
    const results: Record<string, string> = {}
    for (const sql of [...refused, ...allowed]) {
      results[sql] = await request.db.query(sql.includes('$1') ? { text: sql, values: ['app.tenant_id'] } as never : sql)
        .then(() => 'ran', (err: Error & { code?: string }) => err.code ?? err.message)
    }
    return { results, after: (await request.db.query(WHO)).rows[0] }
  })
  const stream = new QueryStream('SELECT set_config(\'role\', \'postgres\', true)')
  app.get('/stream', async (request, reply) => {
    const rows = request.db.query(stream)
    return reply.send(await new Promise((resolve) => rows.on('error', (err: Error & { code?: string }) => resolve({ code: err.code })).on('data', () => resolve({ code: 'ran' }))))
  })
  app.get('/raw', async (request) => request.db.client().then(() => 'handed out', (err: Error & { code?: string }) => err.code))
  const res = await app.inject({ method: 'POST', url: '/try', headers: { 'x-tenant': 'a' } })
  const { results, after } = res.json()
  for (const sql of refused) t.equal(results[sql], 'FST_REQUEST_DB_CONTEXT_STATEMENT', `refused: ${sql}`)
  for (const sql of allowed) t.equal(results[sql], 'ran', `allowed: ${sql}`)
  t.match(after, { who: role, tenant: 'a', user_id: '7', in_tx: true }, 'the role and the settings are as the context set them')
  t.same((await app.inject({ url: '/stream', headers: { 'x-tenant': 'a' } })).json(), { code: 'FST_REQUEST_DB_CONTEXT_STATEMENT' }, 'a stream too')
  t.equal((await app.inject({ url: '/raw', headers: { 'x-tenant': 'a' } })).body, 'FST_REQUEST_DB_CONTEXT_STATEMENT', 'request.db.client() is refused')
  await settled(t, app)
})

t.test('COMMIT by the handler is refused: the context is never dropped half-way', async (t) => {
  const app = await contextApp()
  app.post('/commit', async (request) => {
    await request.db.query("INSERT INTO notes (tenant, body) VALUES ('a', 'before-commit')")
    const commit = await request.db.query('COMMIT').then(() => 'ran', (err: Error & { code?: string }) => err.code)
    return { commit, after: (await request.db.query(WHO)).rows[0] }
  })
  let multi: unknown = null
  app.post('/commit-then-read', async (request) => {
    multi = await request.db.query('SELECT 1; COMMIT').then(() => 'ran', (err: Error & { code?: string }) => err.code)
    return (await request.db.query('SELECT body FROM notes')).rows
  })
  const res = await app.inject({ method: 'POST', url: '/commit', headers: { 'x-tenant': 'a' } })
  t.match(res.json(), { commit: 'FST_REQUEST_DB_TRANSACTION_STATEMENT', after: { who: role, tenant: 'a', in_tx: true } })
  t.equal((await db.admin.query("SELECT count(*)::int AS n FROM notes WHERE body = 'before-commit'")).rows[0].n, 1, 'committed by the route, once')
  const after = await app.inject({ method: 'POST', url: '/commit-then-read', headers: { 'x-tenant': 'a' } })
  t.equal(multi, 'FST_REQUEST_DB_TRANSACTION_STATEMENT', 'a text that ended the transaction fails')
  t.equal(after.statusCode, 503, 'after a text that ended the transaction, nothing more runs (it would run without the context)')
  t.equal(after.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
  await db.admin.query("DELETE FROM notes WHERE body = 'before-commit'")
  await settled(t, app)
})

t.test('transaction(), savepoints, a first-use transaction(), streams and Kysely all run in the context', async (t) => {
  const app = await contextApp()
  await app.register(requestKysely)
  app.get('/nested', async (request) => {
    const inner = await request.db.transaction(async (tx) => {
      const deeper = await tx.transaction(async (tx2) => (await tx2.query(WHO)).rows[0])
      await tx.transaction(async (tx2) => {
        await tx2.query("SELECT set_config('app.other', 'undone', true)")
        throw new Error('roll back to the savepoint')
      }).catch(() => {})
      return { deeper, other: (await tx.query("SELECT current_setting('app.other', true) AS v")).rows[0].v }
    })
    return { ...inner, after: (await request.db.query(WHO)).rows[0] }
  })
  app.get('/stream', async (request) => {
    const rows: unknown[] = []
    for await (const row of request.db.query(new QueryStream('SELECT body FROM notes ORDER BY body'))) rows.push(row)
    return rows
  })

  app.get('/kysely', async (request) => {
    const rows = await request.kysely.selectFrom('notes' as never).select('body' as never).orderBy('body' as never).execute()
    const inTx = await request.kysely.transaction().execute(async (trx) =>
      (await trx.selectFrom('notes' as never).select('tenant' as never).execute()).map((r) => (r as { tenant: string }).tenant))
    return { rows, inTx }
  })
  app.get('/first-use', async (request) => {
    const inner = await request.db.transaction(async (tx) => (await tx.query(WHO)).rows[0])
    return { inner, after: (await request.db.query(WHO)).rows[0] }
  })
  const nested = (await app.inject({ url: '/nested', headers: { 'x-tenant': 'b' } })).json()
  t.match(nested.deeper, { who: role, tenant: 'b' }, 'inside nested transaction() calls (savepoints)')
  t.ok(nested.other === null || nested.other === '', 'a savepoint rolled back undoes what was set in it')
  t.match(nested.after, { who: role, tenant: 'b', in_tx: true }, 'after them, still the context')
  const first = (await app.inject({ url: '/first-use', headers: { 'x-tenant': 'a' } })).json()
  t.match(first, { inner: { who: role, tenant: 'a' }, after: { who: role, tenant: 'a', in_tx: true } }, 'transaction() as the first use')
  t.same((await app.inject({ url: '/stream', headers: { 'x-tenant': 'a' } })).json(), [{ body: 'a-1' }, { body: 'a-2' }], 'a stream')
  t.same((await app.inject({ url: '/kysely', headers: { 'x-tenant': 'b' } })).json(), { rows: [{ body: 'b-1' }], inTx: ['b'] }, 'Kysely, and its transaction() as a savepoint')
  await settled(t, app)
})

t.test('a streamed reply on a context route: the tenant’s rows, committed at the stream’s end', async (t) => {
  const app = await contextApp()
  app.get('/export', (request, reply) => {
    reply.type('application/x-ndjson').send(pipeline(request.db.query(new QueryStream(
      "SELECT tenant, body, current_setting('app.tenant_id') AS setting FROM notes ORDER BY body")), ndjson(), () => {}))
  })
  app.post('/export-write', (request, reply) => {
    reply.send(pipeline(request.db.query(new QueryStream(
      "INSERT INTO notes (tenant, body) VALUES ('b', 'streamed-write') RETURNING tenant")), ndjson(), () => {}))
  })
  const res = await app.inject({ url: '/export', headers: { 'x-tenant': 'a' } })
  const rows = res.body.trim().split('\n').map((line) => JSON.parse(line))
  t.same(rows, [{ tenant: 'a', body: 'a-1', setting: 'a' }, { tenant: 'a', body: 'a-2', setting: 'a' }])
  t.equal((await app.inject({ method: 'POST', url: '/export-write', headers: { 'x-tenant': 'b' } })).statusCode, 200)
  t.equal((await db.admin.query("SELECT count(*)::int AS n FROM notes WHERE body = 'streamed-write'")).rows[0].n, 1, 'committed when the stream ended')
  await db.admin.query("DELETE FROM notes WHERE body = 'streamed-write'")
  await settled(t, app)
})

t.test('a role the database refuses: a typed error, nothing else runs, the client goes back', async (t) => {
  const app = await buildApp(db, { contextRoles: ['no_such_role_17'], context: () => ({ settings: { 'app.tenant_id': 'a' }, role: 'no_such_role_17' }) })
  let second: unknown = null
  app.get('/', async (request) => {
    try {
      await request.db.query('SELECT 1')
    } finally {
      second = await request.db.query('SELECT 1').then(() => 'ran', (err: Error & { code?: string }) => err.code)
    }
  })
  const res = await app.inject('/')
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_REQUEST_DB_INVALID_CONTEXT')
  t.match(res.json().message, /the database refused it .*no_such_role_17/)
  t.equal(second, 'FST_REQUEST_DB_INVALID_CONTEXT', 'a second statement is refused the same way')
  await settled(t, app)
  t.equal((await app.db.query('SELECT 1 AS one')).rows[0].one, 1, 'the pool still serves')
  await t.rejects(app.db.withContext({ role: 'no_such_role_17' }, async () => 'ran'), { code: 'FST_REQUEST_DB_INVALID_CONTEXT', message: /the database refused it/ })
  for (let i = 0; i < 3; i++) t.equal((await app.db.query('SELECT 1 AS one')).rows[0].one, 1, 'no aborted transaction went back to the pool')
})

t.test('app.db: no context, or app.db.withContext(context, fn)', async (t) => {
  const app = await contextApp()
  await app.ready()
  t.not((await app.db.query(WHO)).rows[0].who, role, 'app.db.query has no context')
  const inside = await app.db.withContext({ settings: { 'app.tenant_id': 'b' }, role }, async (tx) => {
    const who = (await tx.query(WHO)).rows[0]
    const bodies = (await tx.query('SELECT body FROM notes')).rows.map((r) => r.body)
    const nested = await tx.transaction(async (inner) => (await inner.query(WHO)).rows[0].tenant)
    const refused = await tx.query('RESET ROLE').then(() => 'ran', (err: Error & { code?: string }) => err.code)
    return { who, bodies, nested, refused }
  })
  t.match(inside, { who: { who: role, tenant: 'b', in_tx: true }, bodies: ['b-1'], nested: 'b', refused: 'FST_REQUEST_DB_CONTEXT_STATEMENT' })
  const unicode = await app.db.withContext({ settings: { 'app.tenant_id': 'b', 'app.display_name': 'Zoë 🚀 ü', 'app.empty': '' } },
    async (tx) => (await tx.query("SELECT current_setting('app.display_name') AS name, current_setting('app.empty') AS empty")).rows[0])
  t.same(unicode, { name: 'Zoë 🚀 ü', empty: '' }, 'multi-byte and empty values arrive as sent')
  await t.rejects(app.db.withContext({ settings: { 'app.tenant_id': 'b' }, role }, async (tx) => {
    await tx.query("INSERT INTO notes (tenant, body) VALUES ('b', 'rolled-back')")
    throw new Error('undo')
  }), /undo/)
  t.equal((await db.admin.query("SELECT count(*)::int AS n FROM notes WHERE body = 'rolled-back'")).rows[0].n, 0, 'rolled back')
  await t.rejects(app.db.withContext({ role: 'postgres' }, async () => 1), { code: 'FST_REQUEST_DB_INVALID_CONTEXT' })
  await t.rejects(app.db.withContext(null as never, async () => 1), { code: 'FST_REQUEST_DB_INVALID_CONTEXT', message: /needs a context/ })
  await settled(t, app)
})

t.test('a role with no contextRoles configured is refused, and says how to allow it', async (t) => {
  const app = await buildApp(db, { context: () => ({ role }) })
  app.get('/', async (request) => (await request.db.query(WHO)).rows[0])
  const res = await app.inject('/')
  t.equal(res.statusCode, 500)
  t.match(res.json(), { code: 'FST_REQUEST_DB_INVALID_CONTEXT', message: /is not in contextRoles \(none are allowed: set the contextRoles option\)/ })
})

t.test('options: context must be a function, contextRoles role names', async (t) => {
  const bad: Array<[RequestDbOptions, RegExp]> = [
    [{ context: 'tenant' as never }, /^Invalid context="tenant": must be a function/],
    [{ contextRoles: 'tenant_user' as never }, /^Invalid contextRoles="tenant_user": must be an array/],
    [{ contextRoles: ['none'] }, /not none or public/],
    [{ contextRoles: [''] }, /1 to 63 bytes/],
    [{ contextRoles: ['x'.repeat(64)] }, /1 to 63 bytes/]
  ]
  for (const [options, message] of bad) {
    await t.rejects(buildApp(db as TestDatabase, options), { code: 'FST_REQUEST_DB_INVALID_OPTION', message })
  }
})
