// diagnostics_channel: what the plugin publishes, as a subscriber (an APM, a metrics library) sees
// it, for real requests on the real server.
import { subscribe, tracingChannel, unsubscribe } from 'node:diagnostics_channel'
import t from 'tap'
import type { AcquireMessage, CancelMessage, QueryMessage, ReleaseMessage } from '../lib/observability/channels.js'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { getOnOwnSocket, listen } from './helpers/http.js'

interface Seen {
  acquire: Array<{ event: string, message: AcquireMessage }>
  query: Array<{ event: string, message: QueryMessage }>
  release: ReleaseMessage[]
  cancel: CancelMessage[]
}

/** Subscribe to every channel for the test's length; only this app's pool's messages are kept. */
function watch (t: { teardown (fn: () => void): void }, pool: () => unknown): Seen {
  const seen: Seen = { acquire: [], query: [], release: [], cancel: [] }
  const traced = (name: 'acquire' | 'query'): void => {
    const handlers = Object.fromEntries(['start', 'end', 'asyncStart', 'asyncEnd', 'error'].map((event) => [event, (message: any) => {
      if (message.pool === pool()) (seen[name] as Array<{ event: string, message: unknown }>).push({ event, message })
    }]))
    const channel = tracingChannel(`fastify-request-db:${name}`)
    channel.subscribe(handlers as never)
    t.teardown(() => channel.unsubscribe(handlers as never))
  }
  traced('acquire')
  traced('query')
  const onRelease = (message: unknown): void => { if ((message as ReleaseMessage).pool === pool()) seen.release.push(message as ReleaseMessage) }
  const onCancel = (message: unknown): void => { if ((message as CancelMessage).pool === pool()) seen.cancel.push(message as CancelMessage) }
  subscribe('fastify-request-db:release', onRelease)
  subscribe('fastify-request-db:cancel', onCancel)
  t.teardown(() => {
    unsubscribe('fastify-request-db:release', onRelease)
    unsubscribe('fastify-request-db:cancel', onCancel)
  })
  return seen
}

t.test('each checkout, statement and release of a request is published with its request, never its values', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 2 })
  const seen = watch(t, () => app.db.pool)
  app.get('/two', async (request) => {
    await request.db.query('SELECT $1::text AS secret', ['s3cret-value'])
    return (await request.db.query('SELECT 2 AS n')).rows[0]
  })
  app.get('/fails', async (request) => request.db.query('SELECT * FROM no_such_table'))
  app.get('/set', async (request) => request.db.query("SET application_name = 'x'"))
  app.get('/raw', async (request) => (await request.db.client()).query('SELECT 1'))
  app.get('/tx', { config: { db: { transaction: true } } }, async (request) => (await request.db.query('SELECT 1 AS n')).rows)
  await app.ready()

  const two = await app.inject('/two')
  t.equal(two.statusCode, 200)
  const acquires = seen.acquire.filter((e) => e.event === 'asyncEnd')
  t.equal(acquires.length, 1, 'one checkout for the request')
  t.equal(typeof acquires[0].message.waitMs, 'number')
  t.ok(acquires[0].message.request !== null, 'the checkout names its request')
  t.same(seen.acquire.map((e) => e.event), ['start', 'end', 'asyncStart', 'asyncEnd'])
  const queries = seen.query.filter((e) => e.event === 'asyncEnd').map((e) => e.message)
  t.same(queries.map((m) => m.text), ['SELECT $1::text AS secret', 'SELECT 2 AS n'])
  t.ok(queries.every((m) => m.request === acquires[0].message.request && typeof m.durationMs === 'number' && m.command === 'SELECT' && m.rowCount === 1))
  t.notMatch(JSON.stringify(queries.map((m) => ({ ...m, request: null, pool: null }))), /s3cret-value/, 'values are never published')
  t.equal(seen.release.length, 1)
  t.same({ destroyed: seen.release[0].destroyed, reason: seen.release[0].reason }, { destroyed: false, reason: null })
  t.equal(seen.release[0].request, acquires[0].message.request)
  t.ok(seen.release[0].heldMs >= 0, `held ${seen.release[0].heldMs.toFixed(2)} ms`)

  seen.query.length = 0
  t.equal((await app.inject('/fails')).statusCode, 500)
  const failed = seen.query.find((e) => e.event === 'error')
  t.equal((failed?.message.error as { code?: string } | undefined)?.code, '42P01', 'a failed statement publishes its error')

  seen.release.length = 0
  await app.inject('/set')
  await app.inject('/raw')
  await app.inject('/tx')
  t.same(seen.release.map((m) => [m.destroyed, m.reason]), [[true, 'session-changed'], [true, 'raw-client'], [false, null]], 'why each connection was closed or kept')
  t.same(seen.query.filter((e) => e.event === 'asyncEnd').slice(-3).map((e) => e.message.text), ['BEGIN', 'SELECT 1 AS n', 'COMMIT'], 'a route transaction\'s BEGIN and COMMIT are statements too')
})

t.test('timeouts, cancels and streams', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { max: 1, acquireTimeoutMs: 200, abortGraceMs: 0 })
  const seen = watch(t, () => app.db.pool)
  app.get('/slow', async (request) => request.db.query('SELECT pg_sleep(30)'))
  app.get('/quick', async (request) => request.db.query('SELECT 1'))
  const port = await listen(app)
  const socket = getOnOwnSocket(port, '/slow')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the slow request to hold the only client')
  const timedOut = await app.inject('/quick')
  t.equal(timedOut.statusCode, 503)
  const error = seen.acquire.find((e) => e.event === 'error')
  t.equal((error?.message.error as { code?: string } | undefined)?.code, 'FST_REQUEST_DB_ACQUIRE_TIMEOUT', 'the timed-out checkout publishes its 503')
  socket.destroy()
  await waitFor(() => seen.cancel.length === 1, 3000, 'the cancel')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  t.ok(seen.release.some((m) => m.destroyed && m.reason === 'cancelled'), 'the cancelled connection is closed, and says why')
})
