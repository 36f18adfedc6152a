// app.close() while a keep-alive client (undici, fetch) has a request in flight (#20). The response
// still goes out with `Keep-Alive: timeout=72`, and Node's HTTP server, which closed only the
// sockets idle when close() began, waits for that one until keepAliveTimeout (Fastify's default:
// 72 s; undici keeps it about as long). Not the plugin's doing, but its users meet it: what bounds
// it, per the README's Shutdown section.
import t from 'tap'
import { appBackends, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { getOnOwnSocket, listen } from './helpers/http.js'
import type { FastifyInstance } from 'fastify'

const IN_FLIGHT = 'SELECT pg_sleep(0.3)'
// Far below Fastify's 72 s: close() returning within this is the bound holding.
const BOUND_MS = 5000

async function appWithWork (db: TestDatabase, fastifyOptions = {}): Promise<FastifyInstance> {
  const app = await buildApp(db, {}, fastifyOptions)
  app.get('/work', async (request) => {
    await request.db.query(IN_FLIGHT)
    return 'done'
  })
  return app
}

/** close() once the request's statement runs; how long it took. */
async function closeMidRequest (app: FastifyInstance, db: TestDatabase): Promise<number> {
  await waitFor(async () => (await appBackends(db)).some((b) => b.state === 'active' && b.query === IN_FLIGHT), 5000, 'the statement')
  const started = Date.now()
  await app.close()
  return Date.now() - started
}

t.test('unbounded: close() waits out keepAliveTimeout after the response in flight', async (t) => {
  const db = await createDatabase(t)
  // Short, to keep the test short. A client on a bare socket, which keeps it as long as the server
  // does (node:http's agent and undici close theirs a little before the server's Keep-Alive hint).
  const keepAliveTimeout = 1500
  const app = await appWithWork(db, { keepAliveTimeout })
  const port = await listen(app)
  const socket = getOnOwnSocket(port, '/work')
  t.teardown(() => socket.destroy())
  let response = ''
  socket.setEncoding('utf8').on('data', (chunk: string) => { response += chunk })
  const took = await closeMidRequest(app, db)
  t.match(response, /^HTTP\/1\.1 200 OK\r\n[^]*connection: keep-alive\r\n[^]*\r\n\r\ndone$/i, 'answered 200, with keep-alive')
  t.ok(took >= keepAliveTimeout - 100, `close() waited for the kept-alive socket (${took} ms)`)
})

t.test('Connection: close once closing has begun: the request in flight is answered, and close() returns with it', async (t) => {
  const db = await createDatabase(t)
  const app = await appWithWork(db)
  let closing = false
  app.addHook('preClose', (done) => {
    closing = true
    done()
  })
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close')
    done(null, payload)
  })
  const port = await listen(app)
  const answer = fetch(`http://127.0.0.1:${port}/work`).then(async (res) => ({ status: res.status, connection: res.headers.get('connection'), body: await res.text() }))
  const took = await closeMidRequest(app, db)
  t.same(await answer, { status: 200, connection: 'close', body: 'done' }, 'answered in full')
  t.ok(took < BOUND_MS, `close() returned in ${took} ms`)
  t.same(app.db.stats(), { total: 0, idle: 0, waiting: 0, leased: 0, leaksDetected: 0 })
})

t.test('forceCloseConnections: true bounds close() too, but cuts the request in flight', async (t) => {
  const db = await createDatabase(t)
  const app = await appWithWork(db, { forceCloseConnections: true })
  const port = await listen(app)
  const answer = fetch(`http://127.0.0.1:${port}/work`).then((res) => `status ${res.status}`, (err: Error) => err.message)
  const took = await closeMidRequest(app, db)
  t.equal(await answer, 'fetch failed', 'the client saw its connection cut')
  t.ok(took < BOUND_MS, `close() returned in ${took} ms`)
  // The plugin treated it as a hang-up: nothing left held, nothing left running.
  t.same(app.db.stats(), { total: 0, idle: 0, waiting: 0, leased: 0, leaksDetected: 0 })
  t.equal((await appBackends(db)).length, 0)
})
