// The connectivity check at ready, and the rule that no error or log line shows a password.
import { type AddressInfo, createServer, type Socket } from 'node:net'
import { Writable } from 'node:stream'
import { inspect } from 'node:util'
import Fastify from 'fastify'
import t from 'tap'
import requestDb from '../lib/index.js'
import { adminUrl, createDatabase, waitFor } from './helpers/db.js'

const SECRET = 'Wr0ng-Pa55-d0-not-leak'

function capture (): { stream: Writable, text: () => string } {
  const lines: string[] = []
  const stream = new Writable({
    write (chunk, _enc, done) {
      lines.push(String(chunk))
      done()
    }
  })
  return { stream, text: () => lines.join('') }
}

async function readyError (options: object): Promise<{ err: Error | null, logs: string }> {
  const log = capture()
  const app = Fastify({ logger: { level: 'trace', stream: log.stream } })
  const err = await app.register(requestDb, options).ready().then(() => null, (e: Error) => e)
  await app.close().catch(() => {})
  if (err) app.log.error({ err }, 'startup failed') // what an app would typically log
  return { err, logs: log.text() }
}

t.test('ready() resolves after one SELECT 1 when the database is reachable', async (t) => {
  const db = await createDatabase(t)
  const app = Fastify({ logger: false })
  db.closeFirst.push(() => app.close())
  await app.register(requestDb, { env: { DATABASE_URL: db.url } })
  await app.ready()
  t.equal(app.db.stats().total, 1, 'the check opened one connection, kept idle for the first request')
})

const admin = new URL(adminUrl)
const cases: Array<[string, Record<string, string>, RegExp]> = [
  ['wrong password in DATABASE_URL', { DATABASE_URL: `postgres://${admin.username}:${SECRET}@${admin.hostname}:${admin.port}/postgres` },
    new RegExp(`at ${admin.hostname}:${admin.port}/postgres: .*password authentication failed`)],
  ['wrong password in PGPASSWORD', { PGHOST: admin.hostname, PGPORT: admin.port, PGUSER: admin.username, PGPASSWORD: SECRET, PGDATABASE: 'postgres' },
    new RegExp(`at ${admin.hostname}:${admin.port}/postgres: .*password authentication failed`)],
  ['wrong host in DATABASE_URL', { DATABASE_URL: `postgres://u:${SECRET}@127.0.0.3:1/shop` }, /at 127\.0\.0\.3:1\/shop: .*ECONNREFUSED/],
  ['wrong host with PGPASSWORD', { PGHOST: '127.0.0.3', PGPORT: '1', PGUSER: 'u', PGPASSWORD: SECRET, PGDATABASE: 'shop' }, /at 127\.0\.0\.3:1\/shop: .*ECONNREFUSED/]
]

for (const [name, env, message] of cases) {
  t.test(`${name}: ready() rejects naming host, port and database; no password anywhere`, async (t) => {
    const { err, logs } = await readyError({ env, acquireTimeoutMs: 3000 })
    t.ok(err, 'ready() rejects')
    t.equal((err as { code?: string }).code, 'FST_REQUEST_DB_CONNECT')
    t.match(err?.message, message)
    t.notOk(inspect(err, { depth: 10 }).includes(SECRET), 'not in the error, its stack or its cause')
    t.notOk(JSON.stringify(err, Object.getOwnPropertyNames(err ?? {})).includes(SECRET), 'not in its serialized form')
    t.ok(logs.length > 0, 'something was logged')
    t.notOk(logs.includes(SECRET), 'not in any log line')
  })
}

t.test('a server that accepts but never answers: ready() rejects within acquireTimeoutMs and the attempt is closed', async (t) => {
  // A hung proxy or a paused server: TCP connects, the startup message gets no answer. pg-pool
  // bounds only the wait for a client here, so the client itself must give up on opening the
  // connection, or the attempt would hold a pool slot until the OS gives up on the socket.
  const sockets: Socket[] = []
  let closedByClient = 0
  const silent = createServer((socket) => {
    sockets.push(socket)
    socket.resume() // read (and ignore) the startup message, so the client's hang-up is seen
    socket.on('error', () => {})
    socket.on('close', () => { closedByClient++ })
  })
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    silent.close()
  })
  const { port } = silent.address() as AddressInfo
  const app = Fastify({ logger: false })
  t.teardown(() => app.close().catch(() => {}))
  const started = Date.now()
  const err = await app.register(requestDb, { env: { DATABASE_URL: `postgres://u:${SECRET}@127.0.0.1:${port}/shop` }, acquireTimeoutMs: 300 })
    .ready().then(() => null, (e: Error) => e)
  const elapsed = Date.now() - started
  t.equal((err as { code?: string } | null)?.code, 'FST_REQUEST_DB_CONNECT')
  t.match(err?.message, new RegExp(`at 127\\.0\\.0\\.1:${port}/shop`))
  t.ok(elapsed < 3000, `rejected after ${elapsed} ms`)
  t.equal(sockets.length, 1, 'one connection was attempted')
  // Before app.close(): the client gives up on its own.
  await waitFor(() => closedByClient > 0, 3000, 'the client to close its attempt')
  t.equal(closedByClient, 1, 'and closed by the client, not left open')
})
