// Route option config: { db: { transaction: true } }: the whole request in one transaction.
import Fastify, { type FastifyRequest } from 'fastify'
import t from 'tap'
import requestDb from '../lib/index.js'
import { buildApp, createDatabase, poolWatchingStatements, waitFor } from './helpers/db.js'

t.test('committed before the response when the handler succeeds; rolled back when it throws', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE orders (id int PRIMARY KEY)')
  const app = await buildApp(db)
  const tx = { config: { db: { transaction: true } } }
  app.post('/ok/:id', tx, async (request) => {
    await request.db.query('INSERT INTO orders VALUES ($1)', [Number((request.params as { id: string }).id)])
    // Inside the route's transaction, transaction() nests as a savepoint.
    await request.db.transaction(async (inner) => { await inner.query('SELECT 1') })
    const { rows } = await request.db.query("SELECT now() = statement_timestamp() AS same_statement")
    return { inTransaction: rows[0].same_statement === false }
  })
  app.post('/throws', tx, async (request) => {
    await request.db.query('INSERT INTO orders VALUES (100)')
    throw new Error('after the insert')
  })
  app.post('/client-error', tx, async (request, reply) => {
    await request.db.query('INSERT INTO orders VALUES (200)')
    return reply.code(422).send({ invalid: true })
  })
  app.post('/no-db', tx, async () => 'nothing to commit')

  t.same((await app.inject({ method: 'POST', url: '/ok/1' })).json(), { inTransaction: true })
  t.equal((await app.inject({ method: 'POST', url: '/ok/2' })).statusCode, 200)
  // Checked the moment the response arrives: the commit must already be visible to others.
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM orders WHERE id = 2')).rows[0].n, 1, 'committed before the response went out')
  t.equal((await app.inject({ method: 'POST', url: '/throws' })).statusCode, 500)
  t.equal((await app.inject({ method: 'POST', url: '/client-error' })).statusCode, 422)
  t.equal((await app.inject({ method: 'POST', url: '/no-db' })).body, 'nothing to commit')
  t.same((await db.admin.query('SELECT id FROM orders ORDER BY id')).rows, [{ id: 1 }, { id: 2 }], 'only the successful requests committed')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('COMMIT that fails (deferred constraint) gives the client a 5xx, never a 2xx', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query(`CREATE TABLE parents (id int PRIMARY KEY);
    CREATE TABLE children (parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)`)
  const app = await buildApp(db)
  app.post('/orphan', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO children VALUES (42)')
    return { created: true }
  })
  app.post('/swallowed', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO parents VALUES (1)')
    await request.db.query('SELECT 1/0').catch(() => {})
    return { created: true }
  })
  const res = await app.inject({ method: 'POST', url: '/orphan' })
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_REQUEST_DB_COMMIT_FAILED')
  t.match(res.json().message, /foreign key/)
  const swallowed = await app.inject({ method: 'POST', url: '/swallowed' })
  t.equal(swallowed.statusCode, 500, 'a transaction that failed inside is not reported as committed')
  t.equal(swallowed.json().code, 'FST_REQUEST_DB_COMMIT_FAILED')
  t.same((await db.admin.query('SELECT (SELECT count(*)::int FROM children) AS c, (SELECT count(*)::int FROM parents) AS p')).rows[0], { c: 0, p: 0 })
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('routes declared right after a register() that was not awaited get request.db and their transaction', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE marks (v int)')
  const app = Fastify({ logger: false })
  db.closeFirst.push(() => app.close())
  void app.register(requestDb, { env: { DATABASE_URL: db.url } })
  app.post('/rollback-me', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO marks VALUES (1)')
    throw new Error('undo it')
  })
  app.post('/commit-me', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO marks VALUES (2)')
    return 'ok'
  })
  await app.ready()
  t.equal((await app.inject({ method: 'POST', url: '/rollback-me' })).statusCode, 500)
  t.equal((await app.inject({ method: 'POST', url: '/commit-me' })).statusCode, 200)
  t.same((await db.admin.query('SELECT v FROM marks')).rows, [{ v: 2 }])
})

t.test('handlerTimeout firing while COMMIT runs: the answer says what COMMIT did (found by the soak run)', async (t) => {
  const db = await createDatabase(t)
  // A deferred constraint trigger makes COMMIT itself slow (and optionally fail).
  await db.admin.query(`CREATE TABLE slow_commit (id int PRIMARY KEY, fail boolean NOT NULL DEFAULT false);
    CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM pg_sleep(0.4); IF NEW.fail THEN RAISE EXCEPTION 'rejected at commit'; END IF; RETURN NULL; END $$;
    CREATE CONSTRAINT TRIGGER slow_check AFTER INSERT ON slow_commit DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION slow_check()`)
  const app = await buildApp(db, {}, { handlerTimeout: 150 })
  app.post('/insert/:id/:fail', { config: { db: { transaction: true } } }, async (request, reply) => {
    const { id, fail } = request.params as { id: string, fail: string }
    await request.db.query('INSERT INTO slow_commit VALUES ($1, $2)', [Number(id), fail === 'yes'])
    return reply.code(201).send({ id: Number(id) })
  })
  const ok = await app.inject({ method: 'POST', url: '/insert/1/no' })
  t.equal(ok.statusCode, 201, 'committed, and said so (not handlerTimeout\'s 503)')
  t.same(ok.json(), { id: 1 })
  const failed = await app.inject({ method: 'POST', url: '/insert/2/yes' })
  t.equal(failed.statusCode, 500, 'COMMIT failed, and said so')
  t.equal(failed.json().code, 'FST_REQUEST_DB_COMMIT_FAILED')
  t.same((await db.admin.query('SELECT id FROM slow_commit ORDER BY id')).rows, [{ id: 1 }], 'the database agrees with both answers')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('transaction() as the first use of request.db nests inside the route transaction', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE firsts (v int)')
  const app = await buildApp(db)
  app.post('/first', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.transaction(async (tx) => { await tx.query('INSERT INTO firsts VALUES (1)') })
    const { rows } = await request.db.query('SELECT now() = statement_timestamp() AS same_statement')
    if (rows[0].same_statement === true) return { outsideTransaction: true }
    throw new Error('roll the route back')
  })
  const res = await app.inject({ method: 'POST', url: '/first' })
  t.equal(res.statusCode, 500, 'the statement after transaction() still ran inside the route transaction')
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM firsts')).rows[0].n, 0, 'transaction() did not commit the route transaction half-way')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})

t.test('transaction() called while the route\'s BEGIN is on the wire waits for it, and nests inside the route transaction', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE during_begin (v int)')
  // The moment pg is handed the route's BEGIN, the handler (another branch of it) calls transaction().
  let issueDuring: FastifyRequest | null = null
  let during: Promise<unknown> = Promise.resolve('not issued')
  const pool = poolWatchingStatements(t, db.url, (text) => {
    const request = issueDuring
    if (request !== null && text === 'BEGIN') {
      issueDuring = null
      during = request.db.transaction(async (tx) => { await tx.query('INSERT INTO during_begin VALUES (1)') })
    }
  })
  const app = await buildApp(db, { pool })
  app.post('/race', { config: { db: { transaction: true } } }, async (request) => {
    issueDuring = request
    await request.db.query('SELECT 1')
    await during
    throw new Error('roll the route back')
  })
  const res = await app.inject({ method: 'POST', url: '/race' })
  t.equal(res.statusCode, 500, res.body)
  t.equal(issueDuring, null, 'transaction() was called while BEGIN was on the wire')
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM during_begin')).rows[0].n, 0,
    'its insert rolled back with the route: it was a savepoint, not a transaction that committed the route half-way')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})
