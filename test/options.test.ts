import Fastify from 'fastify'
import t from 'tap'
import { inspect } from 'node:util'
import requestDb from '../lib/index.js'
import { resolveOptions } from '../lib/options.js'

const SECRET = 's3cr3t-Pa55'

t.test('defaults', async (t) => {
  const o = resolveOptions({}, {})
  t.equal(o.max, 10)
  t.equal(o.acquireTimeoutMs, 5000)
  t.equal(o.idleTimeoutMs, 10000)
  t.equal(o.statementTimeoutMs, 0)
  t.equal(o.shutdownTimeoutMs, 10000)
  t.equal(o.abortGraceMs, 250)
  t.equal(o.maxWaiting, Number.POSITIVE_INFINITY)
  t.equal(o.connectTimeoutMs, 0, 'one try at startup')
  t.equal(o.leakDetectionMs, 0, 'leak detection off')
  t.equal(o.logDbTime, false)
  t.equal(o.serverTiming, false)
  t.same(o.connection, { host: 'localhost', port: 5432, user: undefined, password: undefined, database: undefined })
  t.ok(Object.isFrozen(o), 'resolved options are frozen')
  t.ok(Object.isFrozen(o.connection))
})

t.test('env wins over defaults, explicit options win over env; 0 survives', async (t) => {
  const env = {
    DB_POOL_MAX: '4',
    DB_ACQUIRE_TIMEOUT_MS: '250',
    DB_IDLE_TIMEOUT_MS: '0',
    DB_STATEMENT_TIMEOUT_MS: '1500',
    DB_SHUTDOWN_TIMEOUT_MS: '300',
    DB_ABORT_GRACE_MS: '40',
    DB_POOL_MAX_WAITING: '7'
  }
  const fromEnv = resolveOptions({}, env)
  t.same([fromEnv.max, fromEnv.acquireTimeoutMs, fromEnv.idleTimeoutMs, fromEnv.statementTimeoutMs, fromEnv.shutdownTimeoutMs, fromEnv.abortGraceMs, fromEnv.maxWaiting],
    [4, 250, 0, 1500, 300, 40, 7])
  const explicit = resolveOptions({ max: 2, acquireTimeoutMs: 100, idleTimeoutMs: 5, statementTimeoutMs: 0, shutdownTimeoutMs: 0, abortGraceMs: 0, maxWaiting: 0 }, env)
  t.same([explicit.max, explicit.acquireTimeoutMs, explicit.idleTimeoutMs, explicit.statementTimeoutMs, explicit.shutdownTimeoutMs, explicit.abortGraceMs, explicit.maxWaiting],
    [2, 100, 5, 0, 0, 0, 0])
})

t.test('the observability settings: env over defaults, explicit over env; booleans as true/false/1/0', async (t) => {
  const env = { DB_CONNECT_TIMEOUT_MS: '30000', DB_LEAK_DETECTION_MS: '5000', DB_LOG_TIME: 'TRUE', DB_SERVER_TIMING: ' 1 ' }
  const fromEnv = resolveOptions({}, env)
  t.same([fromEnv.connectTimeoutMs, fromEnv.leakDetectionMs, fromEnv.logDbTime, fromEnv.serverTiming], [30000, 5000, true, true])
  const explicit = resolveOptions({ connectTimeoutMs: 0, leakDetectionMs: 0, logDbTime: false, serverTiming: false }, env)
  t.same([explicit.connectTimeoutMs, explicit.leakDetectionMs, explicit.logDbTime, explicit.serverTiming], [0, 0, false, false], '0 and false survive')
  const off = resolveOptions({}, { DB_LOG_TIME: 'false', DB_SERVER_TIMING: '0' })
  t.same([off.logDbTime, off.serverTiming], [false, false])
})

t.test('options.env is where env is read; the caller\'s object is not changed', async (t) => {
  const options = Object.freeze({ env: Object.freeze({ DB_POOL_MAX: '3' }) })
  t.equal(resolveOptions(options).max, 3)
  const saved = process.env.DB_POOL_MAX
  process.env.DB_POOL_MAX = '6'
  t.teardown(() => { if (saved === undefined) delete process.env.DB_POOL_MAX; else process.env.DB_POOL_MAX = saved })
  t.equal(resolveOptions({}).max, 6, 'process.env by default')
})

t.test('DATABASE_URL, else the libpq variables', async (t) => {
  const byUrl = resolveOptions({}, { DATABASE_URL: `postgres://app:${SECRET}@db.internal:6543/shop?sslmode=require`, PGHOST: 'ignored' })
  t.equal(byUrl.connection.connectionString, `postgres://app:${SECRET}@db.internal:6543/shop?sslmode=require`)
  t.equal(byUrl.target, 'db.internal:6543/shop')
  // pg lets the URL win; these are for what reads the pool's options (instrumentation-pg's pool name).
  t.match(byUrl.connection, { host: 'db.internal', port: 6543, database: 'shop' }, 'the URL\'s own host, port and database beside it')
  t.ok(byUrl.secrets.includes(SECRET))
  const byVars = resolveOptions({}, { PGHOST: '10.1.2.3', PGPORT: '5433', PGUSER: 'u', PGPASSWORD: SECRET, PGDATABASE: 'd' })
  t.same(byVars.connection, { host: '10.1.2.3', port: 5433, user: 'u', password: SECRET, database: 'd' })
  t.equal(byVars.target, '10.1.2.3:5433/d')
  t.ok(byVars.secrets.includes(SECRET))
  const explicit = resolveOptions({ connectionString: 'postgresql://localhost/x' }, { DATABASE_URL: 'postgres://other/y' })
  t.equal(explicit.connection.connectionString, 'postgresql://localhost/x', 'option wins over DATABASE_URL')
  const socketUrl = resolveOptions({}, { DATABASE_URL: 'postgresql:///app?host=/var/run/postgresql', PGPORT: '5433' })
  t.equal(socketUrl.target, '/var/run/postgresql:5433/app', 'unix socket URL')
  t.match(socketUrl.connection, { host: '/var/run/postgresql', port: 5433, database: 'app' })
  t.match(resolveOptions({}, { DATABASE_URL: 'postgres://db.internal', PGDATABASE: 'fallback' }).connection,
    { host: 'db.internal', port: 5432, database: 'fallback' }, 'what the URL leaves out: from the libpq variables and defaults')
})

// Each: [options, env, the setting the error must name, what the message must also say]
const BAD: Array<[Record<string, unknown>, Record<string, string>, string, RegExp]> = [
  [{}, { DB_POOL_MAX: 'abc' }, 'DB_POOL_MAX', /"abc".*whole number from 1/],
  [{}, { DB_POOL_MAX: '0' }, 'DB_POOL_MAX', /"0"/],
  [{}, { DB_POOL_MAX: '-5' }, 'DB_POOL_MAX', /"-5"/],
  [{}, { DB_POOL_MAX: '' }, 'DB_POOL_MAX', /""/],
  [{}, { DB_POOL_MAX: '1e3' }, 'DB_POOL_MAX', /"1e3"/],
  [{}, { DB_POOL_MAX: '99999999999999999999' }, 'DB_POOL_MAX', /to 10000/],
  [{}, { DB_POOL_MAX: '2.5' }, 'DB_POOL_MAX', /"2.5"/],
  [{}, { DB_ACQUIRE_TIMEOUT_MS: '0' }, 'DB_ACQUIRE_TIMEOUT_MS', /from 1/],
  [{}, { DB_ACQUIRE_TIMEOUT_MS: '-1' }, 'DB_ACQUIRE_TIMEOUT_MS', /"-1"/],
  [{}, { DB_IDLE_TIMEOUT_MS: 'soon' }, 'DB_IDLE_TIMEOUT_MS', /"soon"/],
  [{}, { DB_STATEMENT_TIMEOUT_MS: '-100' }, 'DB_STATEMENT_TIMEOUT_MS', /"-100"/],
  [{}, { DB_SHUTDOWN_TIMEOUT_MS: 'Infinity' }, 'DB_SHUTDOWN_TIMEOUT_MS', /"Infinity"/],
  [{}, { DB_SHUTDOWN_TIMEOUT_MS: '9999999999' }, 'DB_SHUTDOWN_TIMEOUT_MS', /2147483647/],
  [{}, { DB_POOL_MAX_WAITING: '0x10' }, 'DB_POOL_MAX_WAITING', /"0x10"/],
  [{ max: 0 }, {}, 'max', /=0:/],
  [{ max: '10' }, {}, 'max', /"10"/],
  [{ max: Number.NaN }, {}, 'max', /NaN/],
  [{ acquireTimeoutMs: -1 }, {}, 'acquireTimeoutMs', /-1/],
  [{ idleTimeoutMs: 1.5 }, {}, 'idleTimeoutMs', /1\.5/],
  [{ shutdownTimeoutMs: Number.POSITIVE_INFINITY }, {}, 'shutdownTimeoutMs', /Infinity/],
  [{}, { DATABASE_URL: `not a url with ${SECRET}` }, 'DATABASE_URL', /not a valid URL/],
  [{}, { DATABASE_URL: `mysql://root:${SECRET}@localhost/db` }, 'DATABASE_URL', /protocol "mysql:"/],
  [{}, { DATABASE_URL: `postgres://u:${SECRET}@localhost:99999/db` }, 'DATABASE_URL', /not a valid URL/],
  [{}, { DATABASE_URL: `postgres://u:${SECRET}@localhost:0/db` }, 'DATABASE_URL', /port 0/],
  [{}, { DATABASE_URL: `postgres://u:${SECRET}@localhost/db?sslmode=sometimes` }, 'DATABASE_URL', /unknown sslmode "sometimes"/],
  [{}, { DATABASE_URL: '' }, 'DATABASE_URL', /is empty/],
  [{}, { DATABASE_URL: `postgres://u:${SECRET}@` }, 'DATABASE_URL', /not a valid URL/],
  [{}, { DATABASE_URL: 'postgres://?sslmode=require' }, 'DATABASE_URL', /neither a host nor a database/],
  [{}, { DATABASE_URL: `postgres//u:${SECRET}@localhost/db` }, 'DATABASE_URL', /hidden.*not a valid URL/],
  [{ connectionString: 42 }, {}, 'connectionString', /must be a string/],
  [{}, { PGPORT: 'fivefourthreetwo' }, 'PGPORT', /port number/],
  [{}, { PGPORT: '70000' }, 'PGPORT', /"70000"/],
  [{ pool: {} }, {}, 'pool', /must be a pg.Pool/],
  [{ poolSize: 3 }, {}, 'options', /poolSize: is not an option/],
  [{}, { DB_CONNECT_TIMEOUT_MS: '30s' }, 'DB_CONNECT_TIMEOUT_MS', /"30s".*whole number from 0/],
  [{ connectTimeoutMs: -1 }, {}, 'connectTimeoutMs', /-1/],
  [{}, { DB_LEAK_DETECTION_MS: '-5' }, 'DB_LEAK_DETECTION_MS', /"-5"/],
  [{ leakDetectionMs: 2.5 }, {}, 'leakDetectionMs', /2\.5/],
  [{}, { DB_LOG_TIME: 'yes please' }, 'DB_LOG_TIME', /"yes please": must be true, false, 1 or 0/],
  [{}, { DB_SERVER_TIMING: '' }, 'DB_SERVER_TIMING', /""/],
  [{ logDbTime: 'true' }, {}, 'logDbTime', /"true": must be true or false/],
  [{ serverTiming: 1 }, {}, 'serverTiming', /=1: must be true or false/]
]

t.test(`${BAD.length} bad inputs: each rejects register() with an error naming the setting, no password`, async (t) => {
  for (const [options, env, setting, reason] of BAD) {
    const label = `${JSON.stringify(options)} ${JSON.stringify(env)}`
    const app = Fastify({ logger: false })
    const err = await app.register(requestDb, { ...options, env } as never).ready().then(() => null, (e: Error) => e)
    await app.close().catch(() => {})
    t.ok(err, `${label} rejects`)
    if (!err) continue
    t.equal((err as { code?: string }).code, 'FST_REQUEST_DB_INVALID_OPTION', `${label}: code`)
    t.ok(err.message.startsWith(`Invalid ${setting}=`), `${label}: names ${setting}: ${err.message}`)
    t.match(err.message, reason, `${label}: says what is wrong`)
    t.notOk(inspect(err, { depth: 5 }).includes(SECRET), `${label}: no password in the error or its cause`)
  }
})
