// A route transaction whose body streams from the request's own connection (#22): it must commit
// after the stream was read to its end, roll back when the client goes away half-way, and never
// deadlock whatever the row count (COMMIT queued behind an open cursor waited for the body).
import QueryStream from 'pg-query-stream'
import t from 'tap'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { listen } from './helpers/http.js'
import { ndjson, timedRequest } from './helpers/streams.js'

t.test('a transaction route streaming from its own connection commits after the stream, at any size', { timeout: 300_000 }, async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE marks (n int, xid xid8)')
  const app = await buildApp(db, { max: 2 })
  app.get<{ Querystring: { rows: string } }>('/export', { config: { db: { transaction: true } } }, async (request, reply) => {
    const n = Number(request.query.rows)
    await request.db.query('INSERT INTO marks VALUES ($1, pg_current_xact_id())', [n])
    const rows = request.db.query(new QueryStream(
      'SELECT i, pg_current_xact_id_if_assigned()::text AS xid FROM generate_series(1, $1::int) AS i', [n], { batchSize: 1000 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  const port = await listen(app)

  for (const rows of [10, 10_000, 1_000_000]) {
    const res = await timedRequest(port, `/export?rows=${rows}`)
    t.equal(res.status, 200)
    t.ok(res.complete, 'the response is complete')
    const lines = res.body.trimEnd().split('\n')
    t.equal(lines.length, rows, `${rows} rows streamed; first byte ${res.firstByteMs} ms, all ${res.totalMs} ms`)
    const { rows: marks } = await db.admin.query('SELECT xid::text FROM marks WHERE n = $1', [rows])
    t.equal(marks.length, 1, 'the insert committed')
    t.equal(JSON.parse(lines[0]).xid, marks[0].xid, 'the rows were read inside the insert\'s transaction')
    t.equal(JSON.parse(lines[lines.length - 1]).xid, marks[0].xid)
    await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
  }
})

t.test('a COMMIT that fails at the stream\'s end cuts the response short: never a complete 200', async (t) => {
  const db = await createDatabase(t)
  // A deferred constraint is checked at COMMIT: the insert is accepted, the COMMIT refused.
  await db.admin.query(`CREATE TABLE parents (id int PRIMARY KEY);
    CREATE TABLE children (parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)`)
  const app = await buildApp(db, { max: 2 })
  app.get('/orphan-export', { config: { db: { transaction: true } } }, async (request, reply) => {
    await request.db.query('INSERT INTO children VALUES (42)')
    const rows = request.db.query(new QueryStream('SELECT generate_series(1, 20000) AS i', [], { batchSize: 1000 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  const port = await listen(app)
  const res = await timedRequest(port, '/orphan-export')
  t.equal(res.status, 200, 'the status went out with the first rows')
  t.notOk(res.complete, 'the body was cut short: the client can tell it failed')
  t.ok(res.body.length > 0, `${res.body.length} bytes arrived before the cut`)
  t.equal((await db.admin.query('SELECT count(*)::int AS n FROM children')).rows[0].n, 0, 'nothing committed')
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release')
})
