// A throwaway PgBouncer (Debian's `pgbouncer` package) in front of a PostgreSQL server, for the tests
// and examples that need the real thing between the app and the database:
//   const bouncer = await startPgBouncer({ target: { host, port, user, password } })
//   … connect to bouncer.url …
//   await bouncer.stop()
import { execFileSync, spawn } from 'node:child_process'
import { accessSync, constants, rmSync } from 'node:fs'
import { chmod, chown, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer, connect } from 'node:net'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'

export const PGBOUNCER_MISSING = 'pgbouncer is not installed: apt-get install -y pgbouncer (Debian/Ubuntu)'

// Debian installs it in /usr/sbin, which is not on every user's PATH.
const SBIN = ['/usr/sbin', '/usr/local/sbin', '/sbin']

/**
 * The pgbouncer executable: $PGBOUNCER if set (and only that), else on the PATH or in an sbin
 * directory. Null when it is not installed.
 */
export function pgbouncerPath () {
  const files = process.env.PGBOUNCER
    ? [process.env.PGBOUNCER]
    : [...(process.env.PATH ?? '').split(delimiter).filter(Boolean), ...SBIN].map((dir) => join(dir, 'pgbouncer'))
  for (const file of files) {
    try {
      accessSync(file, constants.X_OK)
      return file
    } catch {}
  }
  return null
}

/** What to say when it is missing (null when it is there): `PGBOUNCER_MISSING`. */
export function pgbouncerMissing () {
  return pgbouncerPath() === null ? PGBOUNCER_MISSING : null
}

function freePort () {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

/** uid and gid of a local user, or null if there is none by that name. */
function lookUpUser (name) {
  try {
    const [, , uid, gid] = execFileSync('getent', ['passwd', name], { encoding: 'utf8' }).trim().split(':')
    return { name, uid: Number(uid), gid: Number(gid) }
  } catch {
    return null
  }
}

const DEDICATED_USER = 'request-db-pgbouncer'

/**
 * PgBouncer refuses to run as root ("PgBouncer should not run as root"). Run as root, it runs as
 * `user`, else the `postgres` system user (there when the embedded server ran as root), else a
 * dedicated system user created for it. Not root: as ourselves.
 */
function runAsUser (user) {
  if (process.getuid?.() !== 0) return null
  if (user !== undefined) {
    const found = lookUpUser(user)
    if (found === null) throw new Error(`startPgBouncer: there is no user "${user}" to run pgbouncer as`)
    return found
  }
  const existing = lookUpUser('postgres') ?? lookUpUser(DEDICATED_USER)
  if (existing !== null) return existing
  execFileSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', DEDICATED_USER], { stdio: 'pipe' })
  return lookUpUser(DEDICATED_USER)
}

// Values go into pgbouncer.ini and userlist.txt inside double quotes (the userlist) or as they are:
// refuse what would break out of either rather than escape it.
function plain (what, value) {
  if (/["\n\r]/.test(String(value))) throw new Error(`startPgBouncer: ${what} must not contain quotes or newlines`)
  return String(value)
}

/**
 * Start PgBouncer on 127.0.0.1 (a free port) and a Unix socket in its own private folder (0700,
 * owned by the user it runs as), in front of `target`. Every database name is passed through to the
 * server (`* =`), so a test's own database is reached by its name. Clients log in as `target.user`
 * with `target.password` (SCRAM); PgBouncer logs in to the server with the same.
 *
 * @param {{ target: { host?: string, port: number, user: string, password: string },
 *   poolMode?: 'session' | 'transaction' | 'statement', poolSize?: number, maxClientConn?: number,
 *   user?: string, settings?: Record<string, string | number> }} options
 *   `user`: the Unix user to run as when we are root. `settings`: more `[pgbouncer]` lines.
 * @returns {Promise<{ url: string, host: string, port: number, socketDir: string, pid: number,
 *   running: () => boolean, log: () => string, stop: () => Promise<void>, restart: () => Promise<void> }>}
 *   `url` has no database name: set the path (`/mydb`). `log()` is what the running PgBouncer wrote (the
 *   last 64 KiB). `restart()` starts it again on the same port with the same settings (after a crash,
 *   say), stopping it first if it still runs.
 */
export async function startPgBouncer ({ target, poolMode = 'transaction', poolSize = 20, maxClientConn = 500, user, settings = {} }) {
  const binary = pgbouncerPath()
  if (binary === null) throw new Error(PGBOUNCER_MISSING)
  const runAs = runAsUser(user)
  // Run as another user, its folder must be reachable by that user: /tmp is, a TMPDIR under /root
  // is not.
  const dir = await mkdtemp(join(runAs === null ? tmpdir() : '/tmp', 'request-db-pgbouncer-'))
  // If the process ends without stop(), leave neither a pgbouncer nor its folder (and password) behind.
  let child = null
  const onExit = () => {
    if (child !== null && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    rmSync(dir, { recursive: true, force: true })
  }
  process.once('exit', onExit)
  const port = await freePort()
  const ini = [
    '[databases]',
    `* = host=${plain('target.host', target.host ?? '127.0.0.1')} port=${Number(target.port)}`,
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    `unix_socket_dir = ${dir}`,
    'auth_type = scram-sha-256',
    `auth_file = ${join(dir, 'userlist.txt')}`,
    `admin_users = ${plain('target.user', target.user)}`,
    `pool_mode = ${plain('poolMode', poolMode)}`,
    `default_pool_size = ${Number(poolSize)}`,
    `max_client_conn = ${Number(maxClientConn)}`,
    ...Object.entries(settings).map(([key, value]) => `${plain('settings', key)} = ${plain(key, value)}`)
  ].join('\n') + '\n'
  // A plain-text password: PgBouncer then answers both the client's SCRAM and whatever the server asks.
  const userlist = `"${plain('target.user', target.user)}" "${plain('target.password', target.password)}"\n`
  const iniFile = join(dir, 'pgbouncer.ini')
  await writeFile(iniFile, ini, { mode: 0o600 })
  await writeFile(join(dir, 'userlist.txt'), userlist, { mode: 0o600 })
  if (runAs !== null) {
    for (const file of [dir, iniFile, join(dir, 'userlist.txt')]) await chown(file, runAs.uid, runAs.gid)
  }
  await chmod(dir, 0o700)

  let output = ''
  let stopped = false

  async function start () {
    output = ''
    child = spawn(binary, [iniFile], {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(runAs === null ? {} : { uid: runAs.uid, gid: runAs.gid })
    })
    const proc = child
    const keep = (chunk) => { output = (output + chunk).slice(-65536) }
    proc.stdout.setEncoding('utf8').on('data', keep)
    proc.stderr.setEncoding('utf8').on('data', keep)
    const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })))
    // Kept for the process's life: an 'error' (spawn failed, a signal that could not be sent) with no
    // listener would throw in whoever started it.
    const failed = new Promise((resolve) => proc.on('error', (err) => {
      keep(`error: ${err.message}\n`)
      resolve(err)
    }))
    // Ready when it accepts connections; a failure to start shows as an exit or a spawn error first.
    const deadline = Date.now() + 10_000
    for (;;) {
      const outcome = await Promise.race([
        exited.then(({ code, signal }) => new Error(`pgbouncer exited at start (${signal ?? `code ${code}`}):\n${output}`)),
        failed.then((err) => new Error(`pgbouncer could not be started (${binary}): ${err.message}`, { cause: err })),
        accepts(port).then((ok) => ok ? 'up' : null)
      ])
      if (outcome === 'up') return
      if (outcome instanceof Error) throw outcome
      if (Date.now() > deadline) {
        proc.kill('SIGKILL')
        throw new Error(`pgbouncer did not accept connections within 10 s:\n${output}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 25))
    }
  }

  async function halt () {
    const proc = child
    // No pid: it never started (the spawn failed), so there is nothing to stop.
    if (proc === null || proc.pid === undefined || proc.exitCode !== null || proc.signalCode !== null) return
    const exited = new Promise((resolve) => proc.once('exit', resolve))
    // SIGTERM: immediate shutdown in PgBouncer 1.18 (SIGINT waits for clients' queries to end).
    proc.kill('SIGTERM')
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000)
    await exited
    clearTimeout(timer)
  }

  try {
    await start()
  } catch (err) {
    await halt()
    process.removeListener('exit', onExit)
    await rm(dir, { recursive: true, force: true })
    throw err
  }

  const url = new URL('postgres://127.0.0.1')
  url.port = String(port)
  url.username = target.user
  url.password = target.password
  return {
    url: url.toString(),
    host: '127.0.0.1',
    port,
    socketDir: dir,
    get pid () { return child.pid },
    /** The process has not exited. */
    running: () => child.exitCode === null && child.signalCode === null,
    log: () => output,
    async restart () {
      if (stopped) throw new Error('startPgBouncer: restart() after stop()')
      await halt()
      await start()
    },
    /** Stop it and delete its folder. Safe to call twice. */
    async stop () {
      if (stopped) return
      stopped = true
      await halt()
      process.removeListener('exit', onExit)
      await rm(dir, { recursive: true, force: true })
    }
  }
}

/** Does something accept a TCP connection on 127.0.0.1:port? */
function accepts (port) {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    socket.once('connect', () => { socket.destroy(); resolve(true) })
    socket.once('error', () => { socket.destroy(); resolve(false) })
  })
}
