// logDbTime and serverTiming: a request's statements, their time and its wait for a connection, on
// Fastify's own completion line and in a Server-Timing header. Off, neither appears.
import QueryStream from 'pg-query-stream'
import t from 'tap'
import { serverTimingOf } from '../lib/observability/request-timing.js'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { get, listen } from './helpers/http.js'
import { captureLog, type LogLine } from './helpers/log.js'
import { ndjson } from './helpers/streams.js'

interface DbTime { queries: number, ms: number, waitMs: number }

function completed (lines: LogLine[], reqId: string | undefined): LogLine | undefined {
  return lines.find((l) => l.msg === 'request completed' && l.reqId === reqId)
}

function reqIdOf (lines: LogLine[], url: string): string | undefined {
  return lines.find((l) => l.msg === 'incoming request' && (l.req as { url?: string } | undefined)?.url === url)?.reqId
}

/** `db;dur=1.2;desc="3 queries", db-wait;dur=0.1` → its figures. */
function parseServerTiming (header: unknown): DbTime {
  const m = /^db;dur=([\d.]+);desc="(\d+) quer(?:y|ies)", db-wait;dur=([\d.]+)$/.exec(String(header))
  if (m === null) throw new Error(`unexpected Server-Timing: ${String(header)}`)
  return { ms: Number(m[1]), queries: Number(m[2]), waitMs: Number(m[3]) }
}

t.test('logDbTime: db { queries, ms, waitMs } on Fastify\'s "request completed" line, not a line of its own', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { logDbTime: true }, { logger: { level: 'info', stream: log.stream } })
  app.get('/three', async (request) => {
    await request.db.query('SELECT pg_sleep(0.05)')
    await request.db.query('SELECT 2')
    await request.db.query('SELECT 3')
    return 'ok'
  })
  app.get('/none', async () => 'no database')
  const port = await listen(app)
  t.equal((await get(port, '/three')).status, 200)
  t.equal((await get(port, '/none')).status, 200)
  await waitFor(() => log.lines().filter((l) => l.msg === 'request completed').length === 2, 3000, 'two completion lines')

  const lines = log.lines()
  const three = completed(lines, reqIdOf(lines, '/three'))
  t.ok(three, 'the completion line is there')
  const time = three?.db as DbTime
  t.equal(time.queries, 3)
  t.ok(time.ms >= 50, `ms covers the statements: ${time.ms}`)
  t.ok(time.ms < (three?.responseTime as number), 'and is part of the response time')
  t.ok(time.waitMs >= 0 && time.waitMs < 1000, `waitMs: ${time.waitMs}`)
  t.equal((three?.res as { statusCode?: number }).statusCode, 200, 'still Fastify\'s line, with its own fields')
  t.equal(lines.filter((l) => l.db !== undefined).length, 2, 'no extra line: only the two completion lines carry db')
  t.same(completed(lines, reqIdOf(lines, '/none'))?.db, { queries: 0, ms: 0, waitMs: 0 }, 'a route that never queried')
})

t.test('waitMs is the time spent waiting for a connection', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { logDbTime: true, serverTiming: true, max: 1 }, { logger: { level: 'info', stream: log.stream } })
  app.get('/hold', async (request) => {
    await request.db.query('SELECT pg_sleep(0.4)')
    return 'ok'
  })
  app.get('/after', async (request) => {
    await request.db.query('SELECT 1')
    return 'ok'
  })
  await app.ready()
  const holding = app.inject('/hold')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the first request to hold the only client')
  const after = await app.inject('/after')
  await holding
  const time = parseServerTiming(after.headers['server-timing'])
  t.ok(time.waitMs >= 250, `waited for the held client: ${time.waitMs} ms`)
  t.ok(time.ms < time.waitMs, 'its own statement was quick')
  await waitFor(() => log.lines().filter((l) => l.msg === 'request completed').length === 2, 3000, 'two completion lines')
  const waited = log.lines().filter((l) => l.msg === 'request completed' && (l.db as DbTime).waitMs >= 250)
  t.equal(waited.length, 1, 'the completion line of the request that waited shows it too')
})

t.test('serverTiming: the header, with a route transaction\'s COMMIT counted', async (t) => {
  const db = await createDatabase(t)
  // COMMIT itself takes 300 ms: a deferred constraint trigger that sleeps.
  await db.admin.query(`
    CREATE TABLE notes (id serial PRIMARY KEY, body text);
    CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
    CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON notes DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION slow_commit();`)
  const app = await buildApp(db, { serverTiming: true })
  app.post('/notes', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO notes (body) VALUES ($1)', ['hello'])
    return { ok: true }
  })
  app.get('/own-header', async (request, reply) => {
    await request.db.query('SELECT 1')
    reply.header('server-timing', 'app;dur=1')
    return 'ok'
  })
  app.get('/none', async () => 'no database')
  await app.ready()

  const note = await app.inject({ method: 'POST', url: '/notes' })
  t.equal(note.statusCode, 200)
  const time = parseServerTiming(note.headers['server-timing'])
  t.equal(time.queries, 3, 'BEGIN, INSERT, COMMIT')
  t.ok(time.ms >= 300, `the COMMIT's 300 ms are in: ${time.ms}`)

  const own = await app.inject('/own-header')
  t.match(own.headers['server-timing'], /^app;dur=1, db;dur=[\d.]+;desc="1 query", db-wait;dur=[\d.]+$/, 'appended to the route\'s own')
  t.equal((await app.inject('/none')).headers['server-timing'], 'db;dur=0;desc="0 queries", db-wait;dur=0')
  t.equal(serverTimingOf({ queries: 2, ms: 1.25, waitMs: 0.5 }), 'db;dur=1.25;desc="2 queries", db-wait;dur=0.5')
})

t.test('a failed COMMIT: the error response carries the header too', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query(`
    CREATE TABLE items (id int PRIMARY KEY, parent int);
    ALTER TABLE items ADD FOREIGN KEY (parent) REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED;`)
  const app = await buildApp(db, { serverTiming: true })
  app.post('/orphan', { config: { db: { transaction: true } } }, async (request) => {
    await request.db.query('INSERT INTO items VALUES (1, 99)')
    return { ok: true }
  })
  const res = await app.inject({ method: 'POST', url: '/orphan' })
  t.equal(res.statusCode, 500)
  t.equal(res.json().code, 'FST_REQUEST_DB_COMMIT_FAILED')
  t.equal(parseServerTiming(res.headers['server-timing']).queries, 3, 'BEGIN, INSERT, the COMMIT that failed')
})

t.test('a streamed response: the completion line counts the stream to its end; the header what ran before it', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, { logDbTime: true, serverTiming: true }, { logger: { level: 'info', stream: log.stream } })
  app.get('/rows', async (request, reply) => {
    await request.db.query('SELECT 1')
    // Slow rows: the stream runs for about 200 ms after the headers went.
    const rows = request.db.query(new QueryStream('SELECT i, pg_sleep(0.02) FROM generate_series(1, 10) AS i', [], { batchSize: 1 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  const port = await listen(app)
  const res = await get(port, '/rows')
  t.equal(res.status, 200)
  t.equal(res.body.trim().split('\n').length, 10)
  const header = parseServerTiming(res.headers['server-timing'])
  t.equal(header.queries, 2, 'the stream had started when the headers went')
  await waitFor(() => log.lines().some((l) => l.msg === 'request completed'), 3000, 'the completion line')
  const line = log.lines().find((l) => l.msg === 'request completed')
  const time = line?.db as DbTime
  t.equal(time.queries, 2)
  t.ok(time.ms >= 200, `the stream's time is in: ${time.ms} ms`)
  t.ok(time.ms > header.ms, 'more than the header could know')
})

t.test('off (the default): no db field, no header, and a request keeps no books', async (t) => {
  const db = await createDatabase(t)
  const log = captureLog()
  const app = await buildApp(db, {}, { logger: { level: 'info', stream: log.stream } })
  app.get('/one', async (request) => {
    await request.db.query('SELECT 1')
    return { activity: (request.db as unknown as { activity: unknown }).activity }
  })
  const res = await app.inject('/one')
  t.same(res.json(), { activity: null })
  t.equal(res.headers['server-timing'], undefined)
  await waitFor(() => log.lines().some((l) => l.msg === 'request completed'), 3000, 'the completion line')
  t.notOk(log.lines().some((l) => l.db !== undefined), 'no db field anywhere')
})

t.test('env: DB_LOG_TIME and DB_SERVER_TIMING', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { env: { DATABASE_URL: db.url, DB_SERVER_TIMING: 'true', DB_LOG_TIME: '0' } })
  app.get('/one', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  t.match((await app.inject('/one')).headers['server-timing'], /desc="1 query"/)
})
