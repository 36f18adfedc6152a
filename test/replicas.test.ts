// Read replicas (issue #21) on a real streaming replica: reads go where they should
// (pg_is_in_recovery() says where they ran), read-your-writes, a replica stopped mid-run (reads
// fall back, no 5xx beyond the requests that were on it), lag injected with pg_wal_replay_pause()
// while the primary writes on (fallback), and resumed (back). A replica is made from its primary's
// data folder, so this file starts its own primary (scripts/embedded-postgres.mjs) rather than
// using the run's shared server, and a replica of it (scripts/replica.mjs).
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import t from 'tap'
import requestDb, { type RequestDbOptions } from '../lib/index.js'
import { resolveOptions } from '../lib/options.js'
import { lagOf } from '../lib/replicas.js'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'
import { startReplica } from '../scripts/replica.mjs'
import { waitFor } from './helpers/db.js'
import { getOnOwnSocket, listen } from './helpers/http.js'

t.test('options: replicaUrls, DATABASE_REPLICA_URLS, maxReplicaLagMs, DB_MAX_REPLICA_LAG_MS', async (t) => {
  const none = resolveOptions({ env: {} })
  t.same([none.replicas, none.maxReplicaLagMs], [[], 5000], 'defaults: none, 5000')
  const fromEnv = resolveOptions({ env: { DATABASE_REPLICA_URLS: 'postgres://u:secret1@r1:5433/app, postgres://u:secret2@r2/app', DB_MAX_REPLICA_LAG_MS: '250' } })
  t.same(fromEnv.replicas.map((r) => r.target), ['r1:5433/app', 'r2:5432/app'], 'comma-separated, blanks trimmed')
  t.equal(fromEnv.maxReplicaLagMs, 250)
  t.ok(fromEnv.secrets.includes('secret1') && fromEnv.secrets.includes('secret2'), 'replica passwords are masked like the primary\'s')
  t.same(resolveOptions({ replicaUrls: ['postgres://r3/app'], env: { DATABASE_REPLICA_URLS: 'postgres://r1/app' } }).replicas.map((r) => r.target), ['r3:5432/app'], 'the option wins over env')
  t.throws(() => resolveOptions({ replicaUrls: 'postgres://r1/app' as never, env: {} }), { code: 'FST_REQUEST_DB_INVALID_OPTION', message: /^Invalid replicaUrls="postgres:\/\/r1\/app": must be an array/ })
  t.throws(() => resolveOptions({ env: { DATABASE_REPLICA_URLS: 'postgres://u:hunter2@r1/app,mysql://u:pw@r2/app' } }), { message: /^Invalid DATABASE_REPLICA_URLS\[1\]="mysql:\/\/u:\*+@r2\/app": has protocol "mysql:"/ })
  t.throws(() => resolveOptions({ env: { DB_MAX_REPLICA_LAG_MS: '-1' } }), { message: /^Invalid DB_MAX_REPLICA_LAG_MS="-1"/ })
})

t.test('lag from LSN samples and the last replayed commit', async (t) => {
  const samples = [{ lsn: 100n, at: 1000 }, { lsn: 200n, at: 2000 }, { lsn: 300n, at: 3000 }]
  t.equal(lagOf(300n, 60_000, samples, 3500), 0, 'replayed all the newest sample holds: 0, however old its last commit (an idle primary)')
  t.equal(lagOf(250n, 60_000, samples, 3500), 500, 'behind: time since the first sample it has not reached')
  t.equal(lagOf(150n, 60_000, samples, 3500), 1500)
  t.equal(lagOf(50n, 60_000, samples, 3500), 60_000, 'behind even the oldest sample: the time since its last replayed commit')
  t.equal(lagOf(50n, null, samples, 3500), null, 'and unknown without one')
  t.equal(lagOf(null, 1234.4, samples, 3500), 1234, 'no replay position: the time alone')
  t.equal(lagOf(50n, 10, [], 3500), 10, 'no primary position known: the time alone')
})

const primary = await startEmbeddedPostgres({ maxConnections: 60 })
t.teardown(() => primary.stop())
const replica = await startReplica(primary)
t.teardown(() => replica.stop())
t.comment(`primary on 127.0.0.1:${primary.port}, streaming replica on 127.0.0.1:${replica.port} (slot ${replica.slot})`)

const primaryAdmin = new pg.Pool({ connectionString: primary.url, max: 2 })
t.teardown(() => primaryAdmin.end())
await primaryAdmin.query('CREATE DATABASE app')
const on = (url: string, database: string): string => {
  const u = new URL(url)
  u.pathname = `/${database}`
  return u.toString()
}
const primaryUrl = on(primary.url, 'app')
const replicaUrl = on(replica.url, 'app')
const writer = new pg.Pool({ connectionString: primaryUrl, max: 2 })
t.teardown(() => writer.end())
const replicaAdmin = new pg.Pool({ connectionString: replicaUrl, max: 2 })
replicaAdmin.on('error', () => {})
t.teardown(() => replicaAdmin.end())
await writer.query('CREATE TABLE events (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())')
await waitFor(async () => (await replicaAdmin.query("SELECT to_regclass('public.events') AS t").catch(() => ({ rows: [{ t: null }] }))).rows[0].t !== null, 10000, 'the table to reach the replica')

/** An app on the primary with the replica; closed when the test ends. */
async function replicaApp (test: { teardown (fn: () => unknown): void }, options: RequestDbOptions = {}, more?: (app: FastifyInstance) => void): Promise<FastifyInstance> {
  const app = Fastify()
  test.teardown(() => app.close())
  await app.register(requestDb, { env: {}, connectionString: primaryUrl, replicaUrls: [replicaUrl], max: 10, ...options })
  const where = 'SELECT pg_is_in_recovery() AS replica, (SELECT max(id) FROM events) AS last'
  app.get('/read-only', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query(where)).rows[0])
  app.get('/primary', async (request) => (await request.db.query(where)).rows[0])
  app.get('/replica-read', async (request) => (await request.db.replica.query(where)).rows[0])
  app.get('/write-then-read', async (request) => {
    const before = (await request.db.replica.query(where)).rows[0]
    const { rows } = await request.db.query('INSERT INTO events DEFAULT VALUES RETURNING id')
    const after = (await request.db.replica.query(where)).rows[0]
    return { before, after, wrote: rows[0].id }
  })
  app.get('/two-replica-reads', async (request) => {
    const pid = 'SELECT pg_backend_pid() AS pid, pg_is_in_recovery() AS replica'
    const [a, b] = await Promise.all([request.db.replica.query(pid), request.db.replica.query(pid)])
    const c = await request.db.replica.query(pid)
    return [a.rows[0], b.rows[0], c.rows[0]]
  })
  app.get('/in-route-tx', { config: { db: { transaction: true } } }, async (request) => (await request.db.replica.query(where)).rows[0])
  app.get('/read-only-write', { config: { db: { readOnly: true } } }, async (request) => {
    await request.db.query('INSERT INTO events DEFAULT VALUES')
    return 'written'
  })
  more?.(app)
  await app.ready()
  return app
}

function leased (app: FastifyInstance): number {
  return app.db.stats().leased + app.db.replicas.reduce((n, r) => n + r.stats.leased, 0)
}

t.test('reads go where they should; read-your-writes; one lease per pool, given back', async (t) => {
  const app = await replicaApp(t)
  t.match(app.db.replicas, [{ name: `127.0.0.1:${replica.port}/app`, usable: true, reason: null }], 'the replica is usable after the first check')
  const first = await app.inject('/read-only')
  t.equal(first.json().replica, true, `config.db.readOnly: request.db runs on the replica ${first.body}`)
  t.equal((await app.inject('/primary')).json().replica, false, 'a plain route: on the primary')
  t.equal((await app.inject('/replica-read')).json().replica, true, 'request.db.replica.query from a plain route: on the replica')
  const rw = (await app.inject('/write-then-read')).json()
  t.equal(rw.before.replica, true, 'before the request used the primary: the replica')
  t.equal(rw.after.replica, false, 'after it wrote on the primary: its reads stay on the primary')
  t.equal(rw.after.last, rw.wrote, 'and see its own write')
  const three = (await app.inject('/two-replica-reads')).json()
  t.equal(new Set(three.map((r: { pid: number }) => r.pid)).size, 1, 'three replica reads of one request (two of them concurrent): one replica connection')
  t.ok(three.every((r: { replica: boolean }) => r.replica), 'all on the replica')
  t.equal((await app.inject('/in-route-tx')).json().replica, false, 'a route transaction reads inside its transaction, on the primary')
  const write = await app.inject('/read-only-write')
  t.equal(write.statusCode, 500, 'a write on a read-only route fails')
  t.equal(write.json().code, '25006', 'with the replica\'s read_only_sql_transaction')
  const many = await Promise.all(Array.from({ length: 40 }, (_, i) => app.inject(['/read-only', '/replica-read', '/write-then-read', '/primary'][i % 4])))
  t.same(many.filter((r) => r.statusCode !== 200).map((r) => r.body), [], '40 concurrent mixed requests: all served')
  t.equal(leased(app), 0, 'no lease left on the primary or the replica')
  t.ok(app.db.replicas[0].stats.total > 0, 'the replica pool was used')
})

t.test('a database context (row-level security) applies on the replica too: a readOnly route sees its tenant\'s rows only', async (t) => {
  await writer.query(`CREATE ROLE replica_tenant NOLOGIN;
    CREATE TABLE notes (tenant text NOT NULL, body text NOT NULL);
    INSERT INTO notes VALUES ('a', 'a1'), ('a', 'a2'), ('b', 'b1');
    GRANT SELECT ON notes TO replica_tenant;
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
    CREATE POLICY by_tenant ON notes TO replica_tenant USING (tenant = current_setting('app.tenant', true))`)
  t.teardown(() => writer.query('DROP TABLE notes; DROP ROLE replica_tenant'))
  await waitFor(async () => (await replicaAdmin.query("SELECT count(*)::int AS n FROM notes").catch(() => ({ rows: [{ n: 0 }] }))).rows[0].n === 3, 10000, 'the rows to reach the replica')
  const notes = 'SELECT pg_is_in_recovery() AS replica, current_user AS role, array_agg(body ORDER BY body) AS bodies FROM notes'
  const app = await replicaApp(t, {
    contextRoles: ['replica_tenant'],
    context: (request) => ({ settings: { 'app.tenant': String(request.headers['x-tenant']) }, role: 'replica_tenant' })
  }, (app) => {
    app.get('/notes', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query(notes)).rows[0])
    app.get('/notes-replica-read', async (request) => (await request.db.replica.query(notes)).rows[0])
  })
  const a = (await app.inject({ url: '/notes', headers: { 'x-tenant': 'a' } })).json()
  t.same(a, { replica: true, role: 'replica_tenant', bodies: ['a1', 'a2'] }, 'tenant a on the replica: its rows, as the context\'s role')
  const b = (await app.inject({ url: '/notes', headers: { 'x-tenant': 'b' } })).json()
  t.same(b, { replica: true, role: 'replica_tenant', bodies: ['b1'] }, 'tenant b on the replica: its row')
  const viaReplicaRead = (await app.inject({ url: '/notes-replica-read', headers: { 'x-tenant': 'b' } })).json()
  t.same(viaReplicaRead.bodies, ['b1'], `request.db.replica.query in a context request: still tenant b's row only (on the ${viaReplicaRead.replica ? 'replica' : 'primary'})`)
  const many = await Promise.all(Array.from({ length: 40 }, (_, i) => app.inject({ url: i % 2 === 0 ? '/notes' : '/notes-replica-read', headers: { 'x-tenant': i % 3 === 0 ? 'a' : 'b' } })))
  t.same(many.map((r) => r.json().bodies), many.map((_, i) => i % 3 === 0 ? ['a1', 'a2'] : ['b1']), '40 concurrent requests of both tenants: each sees its own rows')
  t.equal(leased(app), 0, 'every lease given back')
})

t.test('a client that hangs up during a replica read: the statement is cancelled on the replica, every lease given back', async (t) => {
  const app = await replicaApp(t, { abortGraceMs: 20 }, (app) => {
    // request.db.replica's own lease, beside a primary lease that is never used.
    app.get('/slow-side', async (request) => (await request.db.replica.query('SELECT pg_sleep(10)')).rows)
    // A read-only route's request.db.
    app.get('/slow-read-only', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query('SELECT pg_sleep(10)')).rows)
  })
  const port = await listen(app)
  const running = async (): Promise<boolean> => (await replicaAdmin.query("SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)' AND pid <> pg_backend_pid()")).rows.length > 0
  for (const path of ['/slow-side', '/slow-read-only']) {
    const socket = getOnOwnSocket(port, path)
    await waitFor(running, 5000, `${path}: the replica statement to run`)
    socket.destroy()
    await waitFor(async () => !await running(), 3000, `${path}: the replica statement to be cancelled`)
    await waitFor(() => leased(app) === 0, 3000, `${path}: every lease given back`)
    t.pass(`${path}: cancelled on the replica after the hang-up, no lease left`)
  }
})

t.test('replica stopped mid-run: reads fall back to the primary, no 5xx beyond the requests that were on it; restarted: back', async (t) => {
  const app = await replicaApp(t, { maxReplicaLagMs: 1000 }, (app) => {
    app.get('/slow-read', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query('SELECT pg_is_in_recovery() AS replica, pg_sleep(0.02)')).rows[0])
  })
  const WORKERS = 8
  const log: Array<{ started: number, at: number, status: number, replica: boolean | null }> = []
  let stopAt = 0
  let running = true
  const worker = async (): Promise<void> => {
    while (running) {
      const started = Date.now()
      const res = await app.inject(Math.random() < 0.5 ? '/slow-read' : '/replica-read')
      log.push({ started, at: Date.now(), status: res.statusCode, replica: res.statusCode === 200 ? res.json().replica : null })
    }
  }
  const workers = Array.from({ length: WORKERS }, worker)
  await new Promise((resolve) => setTimeout(resolve, 500))
  stopAt = Date.now()
  await replica.stopServer()
  const stoppedAt = Date.now()
  await waitFor(() => !app.db.replicas[0].usable, 5000, 'the replica to be seen as gone')
  await new Promise((resolve) => setTimeout(resolve, 500))
  await replica.startServer()
  await waitFor(() => app.db.replicas[0].usable, 15000, 'the replica to be used again')
  await new Promise((resolve) => setTimeout(resolve, 500))
  running = false
  await Promise.all(workers)

  const before = log.filter((e) => e.at < stopAt)
  const failed = log.filter((e) => e.status !== 200)
  const afterStop = log.filter((e) => e.at > stoppedAt + 200 && e.status === 200)
  t.ok(before.length > 0 && before.every((e) => e.status === 200 && e.replica === true), `before: ${before.length} reads, all on the replica`)
  t.ok(failed.length <= WORKERS, `failed: ${failed.length} (statuses ${failed.map((e) => e.status).join(' ') || 'none'}), at most the ${WORKERS} that can have been on it`)
  t.ok(failed.every((e) => e.status === 503), 'and those were 503s')
  t.same(failed.filter((e) => e.started >= stoppedAt).map((e) => `${e.started - stoppedAt} ms after`), [], 'every failed request had started before the replica was down: none that came later failed')
  t.ok(log.some((e) => e.at > stoppedAt && e.status === 200 && e.replica === false), 'while it was down, reads were served by the primary')
  const tail = log.slice(-WORKERS * 2)
  t.ok(tail.every((e) => e.status === 200 && e.replica === true), 'after the restart, reads are on the replica again')
  t.comment(`replica stopped mid-run: ${log.length} reads, ${failed.length} failed (503), ${afterStop.filter((e) => e.replica === false).length} served by the primary while it was down`)
  t.equal(leased(app), 0, 'no lease left')
})

t.test('lag injected (replay paused while the primary writes): fallback; resumed: back', async (t) => {
  const app = await replicaApp(t, { maxReplicaLagMs: 400 })
  t.equal((await app.inject('/read-only')).json().replica, true, 'on the replica at first')
  await replicaAdmin.query('SELECT pg_wal_replay_pause()')
  let writing = true
  const writes = (async () => {
    while (writing) {
      await writer.query('INSERT INTO events DEFAULT VALUES')
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  })()
  const pausedAt = Date.now()
  await waitFor(() => !app.db.replicas[0].usable, 5000, 'the lag to be noticed')
  const noticedMs = Date.now() - pausedAt
  t.match(app.db.replicas[0].reason, /lags \d+ ms behind the primary \(maxReplicaLagMs=400\)/, `noticed ${noticedMs} ms after the pause: ${app.db.replicas[0].reason}`)
  const { rows: [newest] } = await writer.query('SELECT max(id) AS id FROM events')
  const during = (await app.inject('/read-only')).json()
  t.equal(during.replica, false, 'a read-only route reads on the primary meanwhile')
  t.ok(during.last >= newest.id, 'and sees the latest writes')
  t.equal((await app.inject('/replica-read')).json().replica, false, 'request.db.replica too')
  await replicaAdmin.query('SELECT pg_wal_replay_resume()')
  const resumedAt = Date.now()
  await waitFor(() => app.db.replicas[0].usable, 5000, 'the replica to catch up')
  t.pass(`back in use ${Date.now() - resumedAt} ms after replay resumed (lag ${app.db.replicas[0].lagMs} ms)`)
  writing = false
  await writes
  t.equal((await app.inject('/read-only')).json().replica, true, 'reads are on the replica again')
  t.equal(leased(app), 0, 'no lease left')
})

t.test('a replica unreachable at startup: ready() resolves, reads on the primary, its status says why', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(requestDb, { env: {}, connectionString: primaryUrl, replicaUrls: ['postgres://postgres:nope@127.0.0.1:1/app'], acquireTimeoutMs: 500 })
  app.get('/read-only', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query('SELECT pg_is_in_recovery() AS replica')).rows[0])
  await app.ready()
  t.match(app.db.replicas, [{ usable: false, reason: /the check failed \(connect ECONNREFUSED/ }])
  t.notMatch(app.db.replicas[0].reason, /nope/, 'no password in the reason')
  const res = await app.inject('/read-only')
  t.same([res.statusCode, res.json().replica], [200, false], 'served by the primary')
})

t.test('a "replica" that is not in recovery (the primary itself): not used, and the status says why', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(requestDb, { env: {}, connectionString: primaryUrl, replicaUrls: [primaryUrl] })
  await app.ready()
  t.match(app.db.replicas, [{ usable: false, reason: 'it is not in recovery (not a replica, or promoted)' }])
})
