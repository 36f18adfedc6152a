// A client that hangs up mid-statement, twenty times over, with a real PgBouncer (pool_mode =
// transaction) between the app and PostgreSQL. pg's processID and secretKey are then PgBouncer's
// own, and the cancel goes to PgBouncer, which forwards it: it used to be lost there, or to crash
// PgBouncer (issue #19). What happened to each statement is read on the server itself, not through
// PgBouncer. Needs `pgbouncer` installed; with REQUIRE_PGBOUNCER=1 (CI) its absence is a failure.
import pg from 'pg'
import t from 'tap'
import { startPgBouncer } from '../scripts/pgbouncer.mjs'
import { adminUrl, buildApp, createDatabase, type TestDatabase } from './helpers/db.js'
import { havePgBouncer } from './helpers/pgbouncer.js'
import { ABORT_GRACE_MS, addRoutes, assertHangUps, cancelRoundTrips, hangUpRepeatedly, spread, TRIES } from './helpers/hang-up.js'

if (havePgBouncer(t, 'test/cancel-pgbouncer.test.ts (cancel on hang-up through PgBouncer)')) {
  t.test('behind PgBouncer', async (t) => {
    const server = new URL(adminUrl)
    const bouncer = await startPgBouncer({
      target: { host: server.hostname, port: Number(server.port), user: decodeURIComponent(server.username), password: decodeURIComponent(server.password) }
    })
    t.teardown(() => bouncer.stop())
    t.comment(`PgBouncer pid ${bouncer.pid} on 127.0.0.1:${bouncer.port}, pool_mode = transaction`)

    /** The test database through PgBouncer, over TCP. */
    const through = (db: TestDatabase): string => {
      const url = new URL(bouncer.url)
      url.pathname = `/${db.name}`
      return url.toString()
    }
    const crashes: string[] = []
    /** PgBouncer's process is there and a new connection through it answers. */
    const stillUp = (db: TestDatabase) => async (): Promise<void> => {
      // process.kill(pid, 0) sees a process that exited but was not reaped yet: ask the child itself.
      if (!bouncer.running()) {
        const last = bouncer.log().split('\n').filter((line) => /FATAL|PANIC/.test(line)).pop()
        crashes.push(`pid ${bouncer.pid}: ${last ?? 'exited'}`)
        throw new Error(`PgBouncer is gone: ${crashes[crashes.length - 1]}`)
      }
      process.kill(bouncer.pid, 0)
      const client = new pg.Client({ connectionString: through(db), connectionTimeoutMillis: 3000 })
      client.on('error', () => {})
      try {
        await client.connect()
        await client.query('SELECT 1')
      } finally {
        await client.end().catch(() => {})
      }
    }
    const restart = (): Promise<void> => bouncer.restart()

    await t.test('hang-ups on a plain route: each statement cancelled on the server, PgBouncer still up', async (t) => {
      const db = await createDatabase(t)
      const app = await buildApp(db, { connectionString: through(db), env: {}, abortGraceMs: ABORT_GRACE_MS })
      await addRoutes(app, db)
      assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep', { stillUp: stillUp(db), recover: restart }), 'through PgBouncer, plain route')
    })

    await t.test('hang-ups on a route transaction after its INSERT: cancelled, nothing committed, PgBouncer still up', async (t) => {
      const db = await createDatabase(t)
      const app = await buildApp(db, { connectionString: through(db), env: {}, abortGraceMs: ABORT_GRACE_MS })
      await addRoutes(app, db)
      assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep-tx', { stillUp: stillUp(db), recover: restart }), 'through PgBouncer, route transaction')
    })

    await t.test('requestCancel on its own through PgBouncer: the statement ends, then PgBouncer closes the cancel connection', async (t) => {
      const db = await createDatabase(t)
      // What sends the cancel to PgBouncer: pg knows PgBouncer's address and key, not the server's.
      const client = new pg.Client(through(db))
      await client.connect()
      const { rows } = await client.query('SELECT pg_backend_pid() AS pid')
      const seen = client as unknown as { processID: number, port: number }
      t.not(seen.processID, rows[0].pid, `pg's processID (${seen.processID}) is PgBouncer's, not the server backend's (${rows[0].pid})`)
      t.equal(seen.port, bouncer.port, 'and its port is PgBouncer\'s')
      await client.end()
      const run = await cancelRoundTrips({ connectionString: through(db) }, db)
      t.same(run.failures, [], `all ${TRIES} statements cancelled`)
      await stillUp(db)().then(() => t.pass('PgBouncer still up'), (err: Error) => t.fail(err.message))
      t.pass(`through PgBouncer: cancel sent → statement's error: ${spread(run.toError)}`)
      t.pass(`through PgBouncer: cancel sent → cancel connection closed by PgBouncer: ${spread(run.toClose)}`)
    })

    await t.test('over PgBouncer\'s Unix socket (host starting with "/"): hang-ups cancelled, and requestCancel on its own', async (t) => {
      const db = await createDatabase(t)
      const server = new URL(adminUrl)
      const config = { host: bouncer.socketDir, port: bouncer.port, user: decodeURIComponent(server.username), password: decodeURIComponent(server.password), database: db.name }
      const pool = new pg.Pool({ ...config, max: 10 })
      db.closeFirst.push(() => pool.end())
      const app = await buildApp(db, { pool, env: {}, abortGraceMs: ABORT_GRACE_MS })
      await addRoutes(app, db)
      const tries = TRIES / 4
      assertHangUps(t, await hangUpRepeatedly(app, db, '/sleep', { tries, stillUp: stillUp(db), recover: restart }), 'through PgBouncer\'s Unix socket, plain route')
      const run = await cancelRoundTrips(config, db, tries)
      t.same(run.failures, [], `all ${tries} statements cancelled`)
      t.pass(`through PgBouncer's Unix socket: cancel sent → statement's error: ${spread(run.toError)}; → cancel connection closed: ${spread(run.toClose)}`)
    })

    t.same(crashes, [], 'PgBouncer never crashed')
    t.ok(bouncer.running(), `PgBouncer (pid ${bouncer.pid}) still runs at the end`)
  })
}
