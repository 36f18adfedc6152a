// The plugin's typed errors keep their status when a query builder wraps them (Drizzle's
// DrizzleQueryError keeps ours as `cause`): a 503 stays a 503 with Retry-After.
import t from 'tap'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'

t.test('an error that wraps one of ours, with no status of its own, is answered with ours', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1, acquireTimeoutMs: 200 })
  t.teardown(() => app.close())
  const wrapped = (err: unknown): Error => new Error('Failed query: SELECT 1', { cause: err })
  app.get('/hold', async (request) => {
    await request.db.query('SELECT pg_sleep(2)')
    return 'held'
  })
  app.get('/wrapped', async (request) => {
    await request.db.query('SELECT 1').catch((err) => { throw wrapped(err) })
    return 'ok'
  })
  app.get('/own-status', async (request) => {
    await request.db.query('SELECT 1').catch((err) => { throw Object.assign(wrapped(err), { statusCode: 502 }) })
    return 'ok'
  })
  app.get('/foreign-cause', async () => { throw wrapped(Object.assign(new Error('x'), { code: 'ECONNRESET', statusCode: 503 })) })
  await app.ready()

  const holding = app.inject('/hold')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the holder')
  const res = await app.inject('/wrapped')
  t.equal(res.statusCode, 503)
  t.equal(res.json().code, 'FST_REQUEST_DB_ACQUIRE_TIMEOUT')
  t.equal(res.headers['retry-after'], '1')
  t.match(res.json().message, /^Failed query/, 'the wrapper\'s message is kept')
  const own = await app.inject('/own-status')
  t.equal(own.statusCode, 502, 'a wrapper with a status of its own keeps it')
  t.notOk(own.headers['retry-after'])
  await holding
  const foreign = await app.inject('/foreign-cause')
  t.equal(foreign.statusCode, 500, 'a cause that is not the plugin\'s is not looked into')
  t.notOk(foreign.headers['retry-after'])
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})
