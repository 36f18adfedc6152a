// BEGIN, COMMIT and ROLLBACK sent as statements through request.db (what query builders send for
// their own transaction(), or a user by hand): inside the request's transaction they become
// savepoints, or are refused where they would end a transaction they did not begin.
import t from 'tap'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'

t.test('transaction statements on request.db', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE notes (v text)')
  const app = await buildApp(db)
  const notes = async (): Promise<string[]> => (await db.admin.query('SELECT v FROM notes ORDER BY v')).rows.map((r) => r.v)
  t.beforeEach(async () => { await db.admin.query('TRUNCATE notes') })
  const route = { config: { db: { transaction: true } } }

  app.get('/nested-begin', route, async (request) => {
    await request.db.query("INSERT INTO notes VALUES ('outer')")
    await request.db.query('begin')
    await request.db.query("INSERT INTO notes VALUES ('inner, rolled back')")
    await request.db.query('rollback')
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('inner, committed')")
    const commit = await request.db.query('COMMIT')
    return { command: commit.command }
  })
  app.get('/nested-then-throw', route, async (request) => {
    await request.db.query('begin')
    await request.db.query("INSERT INTO notes VALUES ('inner')")
    await request.db.query('commit')
    throw new Error('after the inner commit')
  })
  app.get('/commit-the-route', route, async (request) => {
    await request.db.query("INSERT INTO notes VALUES ('x')")
    await request.db.query('COMMIT')
    return 'unreachable'
  })
  app.get('/begin-isolation', route, async (request) => request.db.query('START TRANSACTION ISOLATION LEVEL SERIALIZABLE'))
  app.get('/multi-statement-commit', route, async (request) => {
    await request.db.query("INSERT INTO notes VALUES ('before')")
    await request.db.query('SELECT 1; COMMIT')
    await request.db.query("INSERT INTO notes VALUES ('after')")
    return 'unreachable'
  })
  app.get('/own-begin', async (request) => {
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('own')")
    await request.db.transaction(async (tx) => {
      await tx.query('BEGIN')
      await tx.query("INSERT INTO notes VALUES ('inside transaction()')")
      await tx.query('COMMIT')
    })
    await request.db.query('ROLLBACK AND NO CHAIN')
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('kept')")
    return (await request.db.query('COMMIT')).command
  })
  app.get('/chain', async (request) => {
    await request.db.query('BEGIN')
    await request.db.query("INSERT INTO notes VALUES ('first')")
    await request.db.query('COMMIT AND CHAIN')
    await request.db.query("INSERT INTO notes VALUES ('second, never committed')")
    return 'left open'
  })
  await app.ready()

  await t.test('a nested BEGIN is a savepoint: its ROLLBACK undoes only its own work', async (t) => {
    const res = await app.inject('/nested-begin')
    t.equal(res.statusCode, 200, res.body)
    t.same(res.json(), { command: 'RELEASE' })
    t.same(await notes(), ['inner, committed', 'outer'])
  })
  await t.test('a nested COMMIT does not commit the route: the handler throws after it, nothing stays', async (t) => {
    t.equal((await app.inject('/nested-then-throw')).statusCode, 500)
    t.same(await notes(), [])
  })
  await t.test('COMMIT of the route\'s own transaction is refused', async (t) => {
    const res = await app.inject('/commit-the-route')
    t.equal(res.statusCode, 500)
    t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT')
    t.same(await notes(), [], 'rolled back, not committed')
  })
  await t.test('a nested BEGIN with an isolation level is refused', async (t) => {
    const res = await app.inject('/begin-isolation')
    t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT')
  })
  await t.test('a COMMIT inside a multi-statement text: the request fails and nothing after it runs', async (t) => {
    const res = await app.inject('/multi-statement-commit')
    t.equal(res.statusCode, 500)
    t.equal(res.json().code, 'FST_REQUEST_DB_TRANSACTION_STATEMENT')
    t.same(await notes(), ['before'], 'what the embedded COMMIT committed stays; nothing after it ran')
  })
  await t.test('outside a route transaction, the request\'s own BEGIN … COMMIT is real, around transaction()', async (t) => {
    const res = await app.inject('/own-begin')
    t.equal(res.statusCode, 200, res.body)
    t.equal(res.body, 'COMMIT')
    t.same(await notes(), ['kept'], 'the first transaction rolled back with everything inside it')
  })
  await t.test('COMMIT AND CHAIN keeps a transaction open: it is rolled back at release, not committed', async (t) => {
    t.equal((await app.inject('/chain')).statusCode, 200)
    t.same(await notes(), ['first'])
  })
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})
