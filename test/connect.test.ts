// The connectivity check at ready, and the rule that no error or log line shows a password.
import { Writable } from 'node:stream'
import { inspect } from 'node:util'
import Fastify from 'fastify'
import t from 'tap'
import requestDb from '../lib/index.js'
import { adminUrl, createDatabase } from './helpers/db.js'

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
