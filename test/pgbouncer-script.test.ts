// scripts/pgbouncer.mjs, which the PgBouncer tests stand on: not root, a private folder that goes
// with it, the settings asked for, stopped by its pid, and clear errors when it can't start.
import { existsSync } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import pg from 'pg'
import t from 'tap'
import { PGBOUNCER_MISSING, pgbouncerMissing, startPgBouncer } from '../scripts/pgbouncer.mjs'
import { adminUrl, waitFor } from './helpers/db.js'
import { havePgBouncer } from './helpers/pgbouncer.js'

const server = new URL(adminUrl)
const target = { host: server.hostname, port: Number(server.port), user: decodeURIComponent(server.username), password: decodeURIComponent(server.password) }
// Asked before the first test, which pretends pgbouncer is missing.
const installed = havePgBouncer(t, 'test/pgbouncer-script.test.ts (scripts/pgbouncer.mjs)')

t.test('pgbouncer missing: a clear error that says how to install it', async (t) => {
  const before = process.env.PGBOUNCER
  process.env.PGBOUNCER = '/nonexistent/pgbouncer'
  t.teardown(() => {
    if (before === undefined) delete process.env.PGBOUNCER
    else process.env.PGBOUNCER = before
  })
  t.equal(pgbouncerMissing(), 'pgbouncer is not installed: apt-get install -y pgbouncer (Debian/Ubuntu)', 'pgbouncerMissing() says so')
  await t.rejects(startPgBouncer({ target }), { message: PGBOUNCER_MISSING }, 'startPgBouncer() rejects with the same words')
})

if (installed) {
  t.test('started: not as root, in a private folder, transaction pooling on 127.0.0.1; stopped by pid, folder gone', async (t) => {
    const bouncer = await startPgBouncer({ target })
    t.teardown(() => bouncer.stop())
    const uid = Number(/^Uid:\s+(\d+)/m.exec(await readFile(`/proc/${bouncer.pid}/status`, 'utf8'))?.[1])
    t.not(uid, 0, `runs as uid ${uid}, not root`)
    const folder = await stat(bouncer.socketDir)
    t.equal(folder.mode & 0o777, 0o700, 'its folder is 0700')
    t.equal(folder.uid, uid, 'and owned by the user it runs as')

    const url = new URL(bouncer.url)
    url.pathname = '/pgbouncer'
    const console = new pg.Client(url.toString())
    await console.connect()
    // The admin console speaks the simple protocol only: no parameters.
    const { rows } = await console.query('SHOW CONFIG')
    await console.end()
    const config = Object.fromEntries(rows.map((r: { key: string, value: string }) => [r.key, r.value]))
    t.same([config.pool_mode, config.listen_addr, Number(config.listen_port)], ['transaction', '127.0.0.1', bouncer.port], 'pool_mode, listen_addr and listen_port, from its admin console')

    url.pathname = '/postgres'
    const client = new pg.Client(url.toString())
    await client.connect()
    t.same((await client.query('SELECT 1 AS one')).rows, [{ one: 1 }], 'a query through it')
    await client.end()

    const pid = bouncer.pid
    await bouncer.stop()
    t.throws(() => process.kill(pid, 0), { code: 'ESRCH' }, 'its process is gone')
    t.notOk(existsSync(bouncer.socketDir), 'its folder is gone')
    await bouncer.stop()
    t.pass('stop() twice is fine')
  })

  t.test('restart(): a new process on the same port, after a crash too', async (t) => {
    const bouncer = await startPgBouncer({ target })
    t.teardown(() => bouncer.stop())
    const first = bouncer.pid
    process.kill(first, 'SIGKILL')
    await waitFor(() => !bouncer.running(), 3000, 'running() to see it gone')
    await bouncer.restart()
    t.not(bouncer.pid, first, 'a new pid')
    const url = new URL(bouncer.url)
    url.pathname = '/postgres'
    const client = new pg.Client(url.toString())
    await client.connect()
    t.same((await client.query('SELECT 1 AS one')).rows, [{ one: 1 }], 'answers on the same port')
    await client.end()
  })

  t.test('a setting PgBouncer refuses: start fails with its own words', async (t) => {
    const err = await startPgBouncer({ target, poolMode: 'bogus' as 'session' }).then(() => null, (e: Error) => e)
    t.match(err?.message, /exited at start[\s\S]*pool_mode/, 'the error quotes PgBouncer')
  })
}
