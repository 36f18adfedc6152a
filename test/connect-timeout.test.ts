// connectTimeoutMs: at startup, wait for a database that comes up late (as containers start
// before theirs), logging each failed try, up to the deadline; then FST_REQUEST_DB_CONNECT.
import Fastify from 'fastify'
import t from 'tap'
import requestDb from '../lib/index.js'
import { adminUrl, createDatabase, type TestDatabase } from './helpers/db.js'
import { captureLog } from './helpers/log.js'
import { type Proxy, startProxy } from './helpers/proxy.js'

const RETRY = 'fastify-request-db: cannot reach PostgreSQL at'
const admin = new URL(adminUrl)
const password = decodeURIComponent(admin.password)

async function closedProxy (t: { teardown (fn: () => unknown): void }): Promise<Proxy> {
  const proxy = await startProxy({ host: admin.hostname, port: Number(admin.port || 5432) })
  t.teardown(() => proxy.close())
  // The port is known and refuses connections: a database not started yet.
  await proxy.cut()
  return proxy
}

function viaPort (db: TestDatabase, port: number): string {
  const url = new URL(db.url)
  url.host = `127.0.0.1:${port}`
  return url.toString()
}

t.test('a database that comes up late: ready() waits for it, each failed try logged without the password', async (t) => {
  const db = await createDatabase(t)
  const proxy = await closedProxy(t)
  const log = captureLog()
  const app = Fastify({ logger: { level: 'info', stream: log.stream } })
  db.closeFirst.push(() => app.close())
  app.register(requestDb, { connectionString: viaPort(db, proxy.port), connectTimeoutMs: 20_000 })
  app.get('/one', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  const started = Date.now()
  const ready = app.ready()
  setTimeout(() => { void proxy.restore() }, 900)
  await ready
  const elapsed = Date.now() - started
  t.ok(elapsed >= 850, `ready after ${elapsed} ms, once the database was up`)
  t.same((await app.inject('/one')).json(), { one: 1 })

  const retries = log.lines().filter((l) => l.msg.startsWith(RETRY))
  // Tries at 0, 250 and 750 ms fail; the one at 1750 ms succeeds.
  t.ok(retries.length >= 2 && retries.length <= 4, `${retries.length} failed tries logged`)
  t.same(retries.slice(0, 2).map((l) => [l.level, l.tries, l.retryInMs]), [[40, 1, 250], [40, 2, 500]], 'warn, with backoff doubling')
  t.match((retries[0].err as { code?: string }).code, 'ECONNREFUSED')
  // pino's err serializer names `type` after the error, not "Object" (the logged copy is a plain one).
  t.equal((retries[0].err as { type?: string }).type, (retries[0].err as { name?: string }).name, 'type: the error\'s name')
  t.not((retries[0].err as { type?: string }).type, 'Object')
  t.notOk('stack' in (retries[0].err as object) && (retries[0].err as { stack?: string }).stack !== '', 'no stack')
  t.match(retries[0].msg, `127.0.0.1:${proxy.port}/${db.name} yet; trying again until connectTimeoutMs=20000 runs out`)
  t.ok(log.lines().some((l) => l.msg === 'fastify-request-db: the database is reachable' && l.tries === retries.length + 1), 'and one line when it is')
  t.notOk(log.text().includes(password), 'no password in any line')
})

t.test('a database that never comes: FST_REQUEST_DB_CONNECT naming the deadline, once it has passed', async (t) => {
  const db = await createDatabase(t)
  const proxy = await closedProxy(t)
  const log = captureLog()
  const app = Fastify({ logger: { level: 'info', stream: log.stream } })
  t.teardown(() => app.close().catch(() => {}))
  const started = Date.now()
  const err = await app.register(requestDb, { env: { DATABASE_URL: viaPort(db, proxy.port), DB_CONNECT_TIMEOUT_MS: '1000' } })
    .ready().then(() => null, (e: Error) => e)
  const elapsed = Date.now() - started
  t.equal((err as { code?: string } | null)?.code, 'FST_REQUEST_DB_CONNECT')
  t.match(err?.message, new RegExp(`^Cannot connect to PostgreSQL at 127\\.0\\.0\\.1:${proxy.port}/${db.name}: .*ECONNREFUSED.* \\(gave up after \\d+ tries; connectTimeoutMs=1000\\)$`))
  t.equal(((err as { cause?: { code?: string } }).cause)?.code, 'ECONNREFUSED', 'the last failure is the cause')
  t.ok(elapsed >= 1000 && elapsed < 3000, `rejected after ${elapsed} ms`)
  const waits = log.lines().filter((l) => l.msg.startsWith(RETRY)).map((l) => l.retryInMs as number)
  // Tries at about 0, 250 and 750 ms; the wait after the third is cut to what is left (≤ 250 ms).
  t.same(waits.slice(0, 2), [250, 500], 'backoff doubling')
  t.ok(waits.length === 3 && waits[2] <= 250, `the last wait cut to the deadline: ${waits.join(', ')}`)
  t.match(err?.message, `gave up after ${waits.length + 1} tries`, 'one more try than waits')
  t.notOk(log.text().includes(password) || String(err?.stack).includes(password), 'no password')
})

t.test('a rejected login is not waited for: it fails at once', async (t) => {
  await createDatabase(t)
  const wrong = new URL(adminUrl)
  wrong.password = 'not-the-password'
  const app = Fastify({ logger: false })
  t.teardown(() => app.close().catch(() => {}))
  const started = Date.now()
  const err = await app.register(requestDb, { connectionString: wrong.toString(), connectTimeoutMs: 20_000 })
    .ready().then(() => null, (e: Error) => e)
  t.equal((err as { code?: string } | null)?.code, 'FST_REQUEST_DB_CONNECT')
  t.match(err?.message, /password authentication failed.*\(gave up after 1 try; connectTimeoutMs=20000\)$/)
  t.ok(Date.now() - started < 3000, 'without waiting for the deadline')
})

t.test('connectTimeoutMs 0 (the default): one try, the error as before', async (t) => {
  const db = await createDatabase(t)
  const proxy = await closedProxy(t)
  const log = captureLog()
  const app = Fastify({ logger: { level: 'info', stream: log.stream } })
  t.teardown(() => app.close().catch(() => {}))
  const err = await app.register(requestDb, { connectionString: viaPort(db, proxy.port) })
    .ready().then(() => null, (e: Error) => e)
  t.equal((err as { code?: string } | null)?.code, 'FST_REQUEST_DB_CONNECT')
  t.notMatch(err?.message, /gave up|connectTimeoutMs/)
  t.notOk(log.lines().some((l) => l.msg.startsWith(RETRY)), 'no retry')
})
