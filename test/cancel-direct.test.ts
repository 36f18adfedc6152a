// A client that hangs up mid-statement, twenty times over, with the app connected straight to
// PostgreSQL (the same tries as cancel-pgbouncer.test.ts, for comparison): over TCP, and over the
// server's Unix socket when it has one on this machine.
import { existsSync } from 'node:fs'
import pg from 'pg'
import t from 'tap'
import { buildApp, createDatabase, type TestDatabase } from './helpers/db.js'
import { ABORT_GRACE_MS, addRoutes, assertHangUps, cancelRoundTrips, hangUpRepeatedly, spread, TRIES } from './helpers/hang-up.js'

t.test('hang-ups on a plain route: each statement cancelled on the server, the app carries on', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { abortGraceMs: ABORT_GRACE_MS })
  await addRoutes(app, db)
  assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep'), 'direct, plain route')
})

t.test('hang-ups on a route transaction after its INSERT: cancelled, nothing committed', async (t) => {
  const db = await createDatabase(t)
  const app = await buildApp(db, { abortGraceMs: ABORT_GRACE_MS })
  await addRoutes(app, db)
  assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep-tx'), 'direct, route transaction')
})

t.test('requestCancel on its own: the statement ends, then the server closes the cancel connection', async (t) => {
  const db = await createDatabase(t)
  const run = await cancelRoundTrips({ connectionString: db.url }, db)
  t.same(run.failures, [], `all ${TRIES} statements cancelled`)
  t.pass(`direct: cancel sent → statement's error: ${spread(run.toError)}`)
  t.pass(`direct: cancel sent → cancel connection closed by the server: ${spread(run.toClose)}`)
})

/** The server's own Unix socket directory, if its socket is on this machine. */
async function unixSocket (db: TestDatabase): Promise<{ dir: string, port: number } | null> {
  const { rows } = await db.admin.query(`SELECT current_setting('unix_socket_directories') AS dirs, current_setting('port')::int AS port`)
  const dir = String(rows[0].dirs).split(',')[0].trim()
  const port = rows[0].port as number
  return dir.startsWith('/') && existsSync(`${dir}/.s.PGSQL.${port}`) ? { dir, port } : null
}

t.test('over a Unix socket (host starting with "/"): hang-ups cancelled, and requestCancel on its own', async (t) => {
  const db = await createDatabase(t)
  const socket = await unixSocket(db)
  if (socket === null) {
    t.pass('the server has no Unix socket on this machine: the Unix-socket cancel did not run here (test/cancel.test.ts covers the path with a stand-in server)', { skip: true })
    return
  }
  const url = new URL(db.url)
  const config = { host: socket.dir, port: socket.port, user: decodeURIComponent(url.username), password: decodeURIComponent(url.password), database: db.name }
  const pool = new pg.Pool({ ...config, max: 10 })
  db.closeFirst.push(() => pool.end())
  const app = await buildApp(db, { pool, env: {}, abortGraceMs: ABORT_GRACE_MS })
  await addRoutes(app, db)
  const tries = TRIES / 4
  assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep', { tries }), `direct over ${socket.dir}/.s.PGSQL.${socket.port}, plain route`)
  const run = await cancelRoundTrips(config, db, tries)
  t.same(run.failures, [], `all ${tries} statements cancelled`)
  t.pass(`direct over a Unix socket: cancel sent → statement's error: ${spread(run.toError)}; → cancel connection closed: ${spread(run.toClose)}`)
})
