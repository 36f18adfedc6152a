// Each test file gets its own database on the run's server (tap runs files in parallel), dropped
// at the end. DATABASE_URL is set by scripts/with-postgres.mjs (an embedded server) or by the user.
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import pg from 'pg'
import requestDb, { type RequestDbOptions } from '../../lib/index.js'

type Test = { teardown (fn: () => unknown): void, name: string }

export const adminUrl: string = (() => {
  const url = process.env.DATABASE_URL
  if (!url) throw new Error('DATABASE_URL is not set: run the tests with `npm test`')
  return url
})()

let counter = 0

export interface TestDatabase {
  name: string
  url: string
  /** A connection as the same user, outside any app under test. */
  admin: pg.Pool
  /** Closed before the database is dropped. */
  closeFirst: Array<() => Promise<unknown>>
}

export async function createDatabase (t: Test): Promise<TestDatabase> {
  const name = `rdb_${process.pid}_${Date.now().toString(36)}_${counter++}`
  const admin = new pg.Pool({ connectionString: adminUrl, max: 2 })
  await admin.query(`CREATE DATABASE ${name}`)
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const dbAdmin = new pg.Pool({ connectionString: url.toString(), max: 3, application_name: 'test-admin' })
  // Tests kill backends on purpose; an idle admin client hit by that must not crash the run.
  dbAdmin.on('error', () => {})
  admin.on('error', () => {})
  const closeFirst: Array<() => Promise<unknown>> = []
  t.teardown(async () => {
    // Apps first: dropping the database terminates whatever is still connected to it.
    for (const close of closeFirst.reverse()) await close().catch(() => {})
    await dbAdmin.end()
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  })
  return { name, url: url.toString(), admin: dbAdmin, closeFirst }
}

/** An app on `db` with the plugin registered; closed when the test ends. */
export async function buildApp (db: TestDatabase, options: RequestDbOptions = {}, fastifyOptions: FastifyServerOptions = {}): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, ...fastifyOptions })
  db.closeFirst.push(() => app.close())
  await app.register(requestDb, { env: { DATABASE_URL: db.url }, ...options })
  return app
}

/** Backends of the app under test: client connections to `db` other than the admin pool's. */
export async function appBackends (db: TestDatabase): Promise<Array<{ pid: number, state: string, query: string }>> {
  const { rows } = await db.admin.query(
    `SELECT pid, state, query FROM pg_stat_activity
      WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
        AND application_name <> 'test-admin'`, [db.name])
  return rows
}

/** Poll until `check` returns a truthy value, or fail after `ms`. */
export async function waitFor<T> (check: () => Promise<T> | T, ms = 5000, what = 'condition'): Promise<T> {
  const deadline = Date.now() + ms
  let last: T
  for (;;) {
    last = await check()
    if (last) return last
    if (Date.now() > deadline) throw new Error(`timed out after ${ms}ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
}

/**
 * A real pg.Pool seen through the plugin's PostgresPool slice, counting every checkout and every
 * release (pg-pool itself throws on a second release of one checkout; this records it).
 */
export function countingPool (url: string, max = 10): { pool: pg.Pool, counts: { acquired: number, released: number, destroyed: number, doubleReleases: number } } {
  const real = new pg.Pool({ connectionString: url, max, connectionTimeoutMillis: 5000 })
  const counts = { acquired: 0, released: 0, destroyed: 0, doubleReleases: 0 }
  const connect = real.connect.bind(real)
  const counted = async (): Promise<pg.PoolClient> => {
    const client = await connect()
    counts.acquired++
    const release = client.release
    let done = false
    client.release = (err?: Error | boolean) => {
      if (done) counts.doubleReleases++
      done = true
      counts.released++
      if (err) counts.destroyed++
      return release.call(client, err)
    }
    return client
  }
  // Both of pg-pool's forms: the plugin uses the callback one.
  ;(real as unknown as { connect: (cb?: (err: Error | undefined, client?: pg.PoolClient) => void) => Promise<pg.PoolClient> | undefined }).connect = (cb) => {
    if (cb === undefined) return counted()
    counted().then((client) => cb(undefined, client), (err: Error) => cb(err))
    return undefined
  }
  return { pool: real, counts }
}

/**
 * A one-connection pool whose client calls `handed(text)` each time pg is handed a statement, right
 * after pg has it (queued or written): to act at that exact moment, as a handler's other branch would.
 */
export function poolWatchingStatements (t: Test, url: string, handed: (text: string) => void): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max: 1 })
  t.teardown(() => pool.end())
  pool.on('connect', (client) => {
    const query = client.query.bind(client) as (...args: unknown[]) => unknown
    ;(client as unknown as { query: (...args: unknown[]) => unknown }).query = (config: unknown, ...rest: unknown[]) => {
      const result = query(config, ...rest)
      handed(typeof config === 'string' ? config : String((config as { text?: unknown } | null)?.text))
      return result
    }
  })
  return pool
}
