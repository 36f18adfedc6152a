// A request's connection dies between two of its statements (pg_terminate_backend, as a restart,
// a failover or an idle timeout would). Going on over a new connection is only allowed when the
// request had set nothing that lives on the connection; otherwise the new one would run with the
// default search_path, the login role, no lock, no temp table: another tenant's rows with a 200.
import { Writable } from 'node:stream'
import type { FastifyRequest } from 'fastify'
import t from 'tap'
import { adminUrl, appBackends, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'

interface Case {
  name: string
  /** What the request sets up on its connection before the backend is killed. */
  setUp: (request: FastifyRequest) => Promise<unknown>
  /** Its next statement, run after the kill. */
  read: string | { name: string, text: string }
  /** Text that must never be in the answer (another tenant's, or the login role's, view). */
  leak?: RegExp
}

async function prepare (db: TestDatabase, reader: string): Promise<void> {
  await db.admin.query(`
    CREATE SCHEMA tenant_a;
    CREATE TABLE tenant_a.secrets (secret text); INSERT INTO tenant_a.secrets VALUES ('tenant-a-secret');
    CREATE TABLE public.secrets (secret text); INSERT INTO public.secrets VALUES ('public-secret');
    CREATE TABLE docs (tenant text, body text); INSERT INTO docs VALUES ('a', 'a-doc'), ('b', 'b-doc');
    ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
    ALTER TABLE docs FORCE ROW LEVEL SECURITY;
    CREATE ROLE ${reader} NOLOGIN;
    GRANT SELECT ON docs TO ${reader};
    CREATE POLICY only_a ON docs TO ${reader} USING (tenant = 'a');
    CREATE TABLE writes (v text);
    CREATE SEQUENCE attempts;`)
}

const cases = (reader: string): Case[] => [
  { name: 'SET search_path', setUp: (r) => r.db.query('SET search_path TO tenant_a, public'), read: 'SELECT secret FROM secrets', leak: /public-secret/ },
  { name: 'SET ROLE (row-level security)', setUp: (r) => r.db.query(`SET ROLE ${reader}`), read: 'SELECT body FROM docs ORDER BY body', leak: /b-doc/ },
  { name: 'set_config(…, false)', setUp: (r) => r.db.query("SELECT set_config('search_path', 'tenant_a, public', false)"), read: 'SELECT secret FROM secrets', leak: /public-secret/ },
  { name: 'session advisory lock', setUp: (r) => r.db.query('SELECT pg_advisory_lock(4242)'), read: "SELECT count(*)::int AS held FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()" },
  { name: 'temporary table', setUp: (r) => r.db.query("CREATE TEMP TABLE scratch AS SELECT 'mine'::text AS v"), read: 'SELECT v FROM scratch' },
  { name: 'PREPARE', setUp: (r) => r.db.query('PREPARE mine AS SELECT secret FROM tenant_a.secrets'), read: 'EXECUTE mine' },
  { name: 'LISTEN', setUp: (r) => r.db.query('LISTEN events'), read: 'SELECT count(*)::int AS channels FROM pg_listening_channels()' },
  { name: 'DECLARE … WITH HOLD', setUp: (r) => r.db.query('DECLARE c CURSOR WITH HOLD FOR SELECT secret FROM tenant_a.secrets'), read: 'FETCH 1 FROM c' },
  {
    name: 'named prepared statement (QueryConfig.name)',
    setUp: (r) => r.db.query({ name: 'tenant_secret', text: 'SELECT secret FROM tenant_a.secrets' }),
    read: { name: 'tenant_secret', text: 'SELECT secret FROM tenant_a.secrets' }
  },
  { name: 'BEGIN inside a multi-statement text', setUp: (r) => r.db.query("BEGIN; INSERT INTO writes VALUES ('multi')"), read: "INSERT INTO writes VALUES ('multi, after the kill') RETURNING v", leak: /after the kill/ },
  { name: 'COMMIT AND CHAIN', setUp: async (r) => { await r.db.query('BEGIN'); await r.db.query('COMMIT AND CHAIN') }, read: "INSERT INTO writes VALUES ('chained, after the kill') RETURNING v", leak: /after the kill/ },
  {
    name: 'request.db.client()',
    setUp: async (r) => (await r.db.client()).query('SET search_path TO tenant_a, public'),
    read: 'SELECT secret FROM secrets',
    leak: /public-secret/
  }
]

/** Kill the backend; with `settle`, wait until the app's socket has seen it die. */
async function kill (db: TestDatabase, pid: number, settle: boolean): Promise<void> {
  await db.admin.query('SELECT pg_terminate_backend($1)', [pid])
  if (!settle) return
  await waitFor(async () => !(await appBackends(db)).some((b) => b.pid === pid), 3000, 'the backend to exit')
  // Its FATAL message and the socket's end are in our socket's buffer now: a timer turn reads them.
  await new Promise((resolve) => setTimeout(resolve, 50))
}

function logCollector (): { lines: string[], stream: Writable } {
  const lines: string[] = []
  const stream = new Writable({
    write (chunk, _encoding, done) {
      lines.push(String(chunk))
      done()
    }
  })
  return { lines, stream }
}

t.test('connection lost between statements: only a request with nothing on the connection goes on', async (t) => {
  const db = await createDatabase(t)
  const reader = `rdb_reader_${db.name}`
  await prepare(db, reader)
  t.teardown(async () => {
    // Before the database is dropped (teardowns run last-added first): the role's grants live there.
    await db.admin.query(`DROP OWNED BY ${reader}; DROP ROLE ${reader}`)
  })
  const log = logCollector()
  const app = await buildApp(db, { max: 4 }, { logger: { level: 'info', stream: log.stream } })
  const all = cases(reader)
  app.get<{ Params: { i: string }, Querystring: { settle: string } }>('/case/:i', async (request) => {
    const c = all[Number(request.params.i)]
    const { rows } = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    await c.setUp(request)
    await kill(db, rows[0].pid, request.query.settle === '1')
    return (await request.db.query(c.read)).rows
  })
  app.get<{ Querystring: { settle: string } }>('/clean', async (request) => {
    const first = await request.db.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
    await kill(db, first.rows[0].pid, true)
    const second = await request.db.query<{ pid: number, secret: string }>('SELECT pg_backend_pid() AS pid, secret FROM secrets')
    return { first: first.rows[0].pid, second: second.rows[0].pid, secret: second.rows[0].secret }
  })
  app.get('/transaction', async (request) => request.db.transaction(async (tx) => {
    const { rows } = await tx.query<{ pid: number }>("INSERT INTO writes VALUES ('in-tx') RETURNING pg_backend_pid() AS pid")
    await kill(db, rows[0].pid, true)
    return (await tx.query("INSERT INTO writes VALUES ('after-kill') RETURNING v")).rows
  }))
  app.get('/route-transaction', { config: { db: { transaction: true } } }, async (request) => {
    const { rows } = await request.db.query<{ pid: number }>("INSERT INTO writes VALUES ('in-route-tx') RETURNING pg_backend_pid() AS pid")
    await kill(db, rows[0].pid, true)
    return (await request.db.query("INSERT INTO writes VALUES ('after-kill') RETURNING v")).rows
  })
  await app.ready()

  await t.test('nothing set: the next statement quietly runs on a new connection', async (t) => {
    const res = await app.inject('/clean')
    t.equal(res.statusCode, 200, res.body)
    t.not(res.json().first, res.json().second, 'a new backend served the second statement')
    t.equal(res.json().secret, 'public-secret', 'the default search_path is what the request had')
  })

  for (const settle of [true, false]) {
    const when = settle ? 'noticed before the next statement' : 'next statement sent at once'
    for (const [i, c] of all.entries()) {
      await t.test(`${c.name}, ${when}: 503 FST_REQUEST_DB_CONNECTION_LOST, nothing of the new connection returned`, async (t) => {
        const res = await app.inject(`/case/${i}?settle=${settle ? 1 : 0}`)
        t.equal(res.statusCode, 503, res.body)
        t.equal(res.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
        t.equal(res.headers['retry-after'], '1')
        if (c.leak !== undefined) t.notMatch(res.body, c.leak, 'no row the request was not meant to see')
        await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
      })
    }
  }

  for (const path of ['/transaction', '/route-transaction']) {
    await t.test(`${path}: the transaction is not continued outside itself; nothing is written`, async (t) => {
      const res = await app.inject(path)
      t.equal(res.statusCode, 503, res.body)
      t.equal(res.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
      t.match(res.json().message, /transaction was open/)
      const { rows } = await db.admin.query('SELECT v FROM writes')
      t.same(rows, [], 'neither the killed transaction\'s row nor a later one landed')
      await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
    })
  }

  await t.test('log lines carry the request id and never the password', async (t) => {
    const password = new URL(adminUrl).password
    const failures = log.lines.map((l) => JSON.parse(l)).filter((l) => /held database connection failed/.test(l.msg))
    t.ok(failures.length >= all.length + 3, `${failures.length} connection-failure lines`)
    t.ok(failures.every((l) => typeof l.reqId === 'string'), 'each names its request')
    if (password !== '') t.notOk(log.lines.some((l) => l.includes(password)), 'no line holds the password')
  })

  t.equal(app.db.stats().leased, 0, 'nothing held at the end')
})

t.test('a statement in flight when the connection broke is never sent again', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE writes (v text); CREATE SEQUENCE attempts')
  const app = await buildApp(db)
  // nextval is not transactional: every time the statement starts, the sequence moves, killed or not.
  app.get('/counted', async (request) => (await request.db.query("SELECT nextval('attempts'), pg_sleep(5)")).rows)
  app.get('/insert', async (request) => (await request.db.query("INSERT INTO writes SELECT 'once' FROM pg_sleep(5) RETURNING v")).rows)
  await app.ready()

  for (const [path, marker] of [['/counted', 'nextval'], ['/insert', 'INSERT']] as const) {
    const answer = app.inject(path)
    const backend = await waitFor(async () => (await appBackends(db)).find((b) => b.state === 'active' && b.query.includes(marker)), 5000, `${path} to run`)
    await db.admin.query('SELECT pg_terminate_backend($1)', [(backend as { pid: number }).pid])
    const res = await answer
    t.equal(res.statusCode, 503, `${path}: ${res.body}`)
    t.equal(res.json().code, 'FST_REQUEST_DB_CONNECTION_LOST')
  }
  // Long enough for a re-sent statement to have started (and, for the insert, to show its row).
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal((await db.admin.query('SELECT last_value::int AS n FROM attempts')).rows[0].n, 1, 'the statement started once')
  t.equal((await appBackends(db)).filter((b) => b.state === 'active').length, 0, 'nothing re-sent is running')
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM writes')).rows[0].n, 0, 'the killed INSERT wrote nothing and was not repeated')
  await waitFor(() => app.db.stats().leased === 0, 2000, 'release')
})
