// Streams on the request's own connection (pg-query-stream, pg-cursor, pg-copy-streams): the
// connection goes back to the pool when they end, a stream the HTTP client walks away from stops
// the backend's work within about a second, and memory stays flat however many rows go by.
import { PassThrough } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import Cursor from 'pg-cursor'
import { from as copyFrom, to as copyTo } from 'pg-copy-streams'
import QueryStream from 'pg-query-stream'
import t from 'tap'
import { appBackends, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { get, listen } from './helpers/http.js'
import { ndjson, readThenHangUp, timedRequest, uploadThenHangUp } from './helpers/streams.js'
import type { FastifyInstance } from 'fastify'

const BIG = 50_000_000

async function activeWith (db: TestDatabase, text: string): Promise<number> {
  return (await appBackends(db)).filter((b) => b.state === 'active' && b.query.includes(text)).length
}

/** An app with a route per kind of stream. */
async function streamingApp (db: TestDatabase, max: number): Promise<FastifyInstance> {
  await db.admin.query('CREATE TABLE items (n int, label text); CREATE TABLE marks (n int)')
  const app = await buildApp(db, { max, abortGraceMs: 50 })
  app.addContentTypeParser('text/csv', (_request, payload, done) => done(null, payload))

  app.get<{ Querystring: { rows: string } }>('/rows', async (request, reply) => {
    const rows = request.db.query(new QueryStream(
      // generate_series in the select list runs row by row; in FROM it would make every row first.
      'SELECT generate_series(1, $1::int) AS i, pg_backend_pid() AS pid', [Number(request.query.rows)], { batchSize: 500 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  app.get('/cursor', async (request) => {
    const cursor = request.db.query(new Cursor('SELECT i, pg_backend_pid() AS pid FROM generate_series(1, 1000) AS i'))
    const rows = await cursor.read(5)
    await cursor.close()
    return { first: rows.map((r: { i: number }) => r.i), pid: rows[0].pid }
  })
  app.get<{ Querystring: { rows: string } }>('/export.csv', async (request, reply) => {
    const csv = request.db.query(copyTo(`COPY (SELECT generate_series(1, ${Number(request.query.rows)}), pg_backend_pid()) TO STDOUT (FORMAT csv)`))
    return reply.type('text/csv').send(csv)
  })
  app.post('/import', { config: { db: { transaction: true } } }, async (request) => {
    await pipeline(request.body as NodeJS.ReadableStream, request.db.query(copyFrom('COPY items (n, label) FROM STDIN (FORMAT csv)')))
    return (await request.db.query('SELECT count(*)::int AS n, pg_backend_pid() AS pid FROM items')).rows[0]
  })
  app.get('/plain', async (request) => (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0])
  app.get('/export-in-transaction', { config: { db: { transaction: true } } }, async (request, reply) => {
    await request.db.query('INSERT INTO marks VALUES (1)')
    const rows = request.db.query(new QueryStream('SELECT generate_series(1, $1::int) AS i', [BIG], { batchSize: 500 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  return app
}

t.test('pool max 2: 30 streaming and plain requests in turn use at most 2 backends', async (t) => {
  const db = await createDatabase(t)
  const app = await streamingApp(db, 2)
  const port = await listen(app)
  const pids = new Set<number>()
  for (let i = 0; i < 30; i++) {
    switch (i % 5) {
      case 0: {
        const res = await timedRequest(port, '/rows?rows=2000')
        const lines = res.body.trimEnd().split('\n')
        t.equal(lines.length, 2000, `${i}: QueryStream, 2000 rows`)
        pids.add(JSON.parse(lines[0]).pid)
        break
      }
      case 1: {
        const res = await get(port, '/cursor')
        t.same(JSON.parse(res.body).first, [1, 2, 3, 4, 5], `${i}: pg-cursor read then closed`)
        pids.add(JSON.parse(res.body).pid)
        break
      }
      case 2: {
        const res = await timedRequest(port, '/export.csv?rows=1000')
        const lines = res.body.trimEnd().split('\n')
        t.equal(lines.length, 1000, `${i}: COPY TO STDOUT, 1000 lines`)
        pids.add(Number(lines[0].split(',')[1]))
        break
      }
      case 3: {
        const csv = Array.from({ length: 100 }, (_, k) => `${k},item ${k}`).join('\n') + '\n'
        const res = await timedRequest(port, '/import', { method: 'POST', body: csv, headers: { 'content-type': 'text/csv' } })
        t.equal(res.status, 200, res.body)
        t.equal(JSON.parse(res.body).n % 100, 0, `${i}: COPY FROM STDIN, 100 rows in`)
        pids.add(JSON.parse(res.body).pid)
        break
      }
      default:
        pids.add(JSON.parse((await get(port, '/plain')).body).pid)
    }
    await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  }
  t.ok(pids.size <= 2, `${pids.size} backends served all 30 (streams give their connection back, not close it)`)
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM items')).rows[0].n, 600, 'every import committed')
})

t.test('streams nobody reads any more stop within about a second, and the lease comes back', async (t) => {
  const db = await createDatabase(t)
  const app = await streamingApp(db, 2)
  const port = await listen(app)

  for (const [path, marker, keepsConnection] of [[`/rows?rows=${BIG}`, 'generate_series', true], [`/export.csv?rows=${BIG}`, 'COPY', false]] as const) {
    const { status, firstLine } = await readThenHangUp(port, path, 256 * 1024)
    t.equal(status, 200, `${path}: answered 200, then the client walked away`)
    // Both routes put the serving backend's pid in every row.
    const served = keepsConnection ? JSON.parse(firstLine).pid : Number(firstLine.split(',')[1])
    const started = Date.now()
    await waitFor(async () => (await activeWith(db, marker)) === 0, 3000, `${path}: the backend to stop`)
    const ms = Date.now() - started
    t.ok(ms < 1500, `${path}: the backend stopped ${ms} ms after the hang-up`)
    await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
    const pids = new Set((await appBackends(db)).map((b) => b.pid))
    if (keepsConnection) t.ok(pids.has(served), `${path}: the cursor was closed and its connection (${served}) kept`)
    else t.notOk(pids.has(served), `${path}: the stalled COPY's connection (${served}) was closed`)
    t.equal(JSON.parse((await get(port, '/plain')).body).pid > 0, true, 'the next request is served')
  }

  await t.test('in a route transaction: rolled back', async (t) => {
    t.equal((await readThenHangUp(port, '/export-in-transaction', 256 * 1024)).status, 200)
    const started = Date.now()
    await waitFor(async () => (await activeWith(db, 'generate_series')) === 0, 3000, 'the backend to stop')
    t.ok(Date.now() - started < 1500, `the backend stopped ${Date.now() - started} ms after the hang-up`)
    await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
    t.equal((await db.admin.query('SELECT count(*)::int AS n FROM marks')).rows[0].n, 0, 'the insert before the stream was rolled back')
  })

  await t.test('an upload the client abandons: nothing imported', async (t) => {
    await uploadThenHangUp(port, '/import', Array.from({ length: 1000 }, (_, k) => `${k},x`).join('\n') + '\n', 'text/csv')
    await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
    await waitFor(async () => (await activeWith(db, 'COPY')) === 0, 3000, 'the COPY to stop')
    t.equal((await db.admin.query('SELECT count(*)::int AS n FROM items')).rows[0].n, 0, 'no row of the half upload')
  })
})

t.test('1,000,000 rows streamed: memory stays flat', { timeout: 120_000 }, async (t) => {
  const db = await createDatabase(t)
  const app = await streamingApp(db, 2)
  const port = await listen(app)
  await timedRequest(port, '/rows?rows=100000', { keep: false })
  const before = process.memoryUsage.rss()
  let peak = before
  const sampler = setInterval(() => { peak = Math.max(peak, process.memoryUsage.rss()) }, 20)
  const res = await timedRequest(port, '/rows?rows=1000000', { keep: false })
  clearInterval(sampler)
  t.equal(res.status, 200)
  t.ok(res.complete)
  t.ok(res.bytes > 1_000_000 * 20, `${res.bytes} bytes in ${res.totalMs} ms`)
  const grew = (peak - before) / 1048576
  t.ok(grew < 50, `RSS grew ${grew.toFixed(1)} MB at its peak (limit 50)`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})

t.test('streams the plugin stops never crash the process, and cursors left open never hang a transaction', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE marks (v text)')
  const app = await buildApp(db, { max: 2, abortGraceMs: 0 }, { handlerTimeout: 300 })
  const route = { config: { db: { transaction: true } } }
  // .pipe() leaves the source without an 'error' listener: the plugin's cancel must not crash us.
  app.get('/outlives-handler-timeout', async (request, reply) => {
    const rows = request.db.query(new QueryStream('SELECT generate_series(1, 100000000) AS i, pg_sleep(0.001)', [], { batchSize: 100 }))
    return reply.send(rows.pipe(ndjson()))
  })
  app.get('/copy-piped', { handlerTimeout: 60_000 }, async (request, reply) => {
    const csv = request.db.query(copyTo(`COPY (SELECT generate_series(1, ${BIG})) TO STDOUT`))
    return reply.type('text/csv').send(csv.pipe(new PassThrough()))
  })
  app.get('/cursor-left-open', route, async (request) => {
    await request.db.query("INSERT INTO marks VALUES ('route')")
    const cursor = request.db.query(new Cursor('SELECT generate_series(1, 1000) AS i'))
    return { first: (await cursor.read(3)).map((r: { i: number }) => r.i) }
  })
  app.get('/cursor-then-throw', route, async (request) => {
    await request.db.query("INSERT INTO marks VALUES ('thrown')")
    const cursor = request.db.query(new Cursor('SELECT generate_series(1, 1000) AS i'))
    await cursor.read(3)
    throw new Error('between read and close')
  })
  app.get('/cursor-in-transaction-fn', { handlerTimeout: 60_000 }, async (request) => request.db.transaction(async (tx) => {
    await tx.query("INSERT INTO marks VALUES ('fn')")
    const cursor = tx.query(new Cursor('SELECT generate_series(1, 1000) AS i'))
    return (await cursor.read(2)).length
  }))
  app.get('/no-content', { ...route, handlerTimeout: 60_000 }, async (request, reply) => {
    await request.db.query("INSERT INTO marks VALUES ('204')")
    return reply.code(204).send(request.db.query(new QueryStream('SELECT generate_series(1, 10) AS i')).pipe(ndjson()))
  })
  app.get('/name-alone', async (request) => request.db.query({ name: 'never-prepared' } as never))
  const port = await listen(app)

  const timedOut = await timedRequest(port, '/outlives-handler-timeout', { keep: false })
  // Whether the 503 or a cut-short body, the statement was cancelled under an unwatched stream.
  t.ok(timedOut.status === 503 || !timedOut.complete, `handlerTimeout answered (${timedOut.status}, complete: ${timedOut.complete}), and the process is still here`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release after the handler timeout')
  t.equal((await readThenHangUp(port, '/copy-piped', 64 * 1024)).status, 200)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release after the piped COPY was abandoned')

  const open = await timedRequest(port, '/cursor-left-open')
  t.equal(open.status, 200, open.body)
  t.same(JSON.parse(open.body), { first: [1, 2, 3] })
  t.equal((await timedRequest(port, '/cursor-then-throw')).status, 500)
  t.equal((await timedRequest(port, '/cursor-in-transaction-fn')).body, '2')
  t.equal((await timedRequest(port, '/no-content')).status, 204)
  const named = await timedRequest(port, '/name-alone')
  t.ok(named.status === 200 || named.status === 500, `a { name } with no text goes to pg as it is (${named.status}): no crash, no hang`)
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  const marks = (await db.admin.query('SELECT v FROM marks ORDER BY v')).rows.map((r) => r.v)
  t.same(marks, ['204', 'fn', 'route'], 'the routes that succeeded committed; the one that threw did not')
})
