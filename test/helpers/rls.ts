// Tables under real row-level security, for the database-context tests (#17). The login user of
// the test server is a superuser, to whom RLS does not apply: requests must switch to the tenant
// role, which owns nothing, and FORCE makes the policies bind the table's owner too.
import { Agent, request as httpRequest } from 'node:http'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { DbContextFunction } from '../../lib/index.js'
import type { TestDatabase } from './db.js'

export interface TenantSchema {
  /** The non-owner role requests run as: unique per database (roles are cluster-wide). */
  role: string
}

/**
 * `notes (id, tenant, body)` under a policy that shows and accepts only the rows of
 * `current_setting('app.tenant_id')`, readable and writable by `role` alone. The role is dropped
 * before the database is.
 */
export async function createTenantSchema (db: TestDatabase): Promise<TenantSchema> {
  const role = `${db.name}_tenant`
  await db.admin.query(`
    CREATE ROLE ${role} NOLOGIN;
    GRANT ${role} TO CURRENT_USER;
    CREATE TABLE notes (id bigserial PRIMARY KEY, tenant text NOT NULL, body text NOT NULL);
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    ALTER TABLE notes FORCE ROW LEVEL SECURITY;
    GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO ${role};
    GRANT USAGE ON SEQUENCE notes_id_seq TO ${role};
    CREATE POLICY tenant_isolation ON notes TO ${role}
      USING (tenant = current_setting('app.tenant_id', true))
      WITH CHECK (tenant = current_setting('app.tenant_id', true));`)
  // Run first of the closers (they run last-pushed first): after every app is closed.
  db.closeFirst.unshift(() => db.admin.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`))
  return { role }
}

export interface Row { tenant: string, body: string }

const tenantOf = (request: FastifyRequest): string => String(request.headers['x-tenant'])

/** Each tenant's 20 seed rows, `seed:<tenant>:<n>`. */
export async function seedTenants (db: TestDatabase, tenants: readonly string[]): Promise<void> {
  await db.admin.query(`INSERT INTO notes (tenant, body)
    SELECT tenant, 'seed:' || tenant || ':' || n FROM unnest($1::text[]) AS tenant, generate_series(1, 20) AS n`, [tenants])
}

/** The context the load routes run with: the tenant from `x-tenant`, the request id, the role. */
export function tenantContext (role: string): DbContextFunction {
  return (request) => Promise.resolve({ settings: { 'app.tenant_id': tenantOf(request), 'app.request_id': String(request.id) }, role })
}

/**
 * The routes of the interleaved load: reads, writes (`w:<tenant>:<id>`), writes forged for another
 * tenant (`f:…`, which the policy must refuse), an UPDATE of every row it can see, handlers that
 * throw, time out (handlerTimeout) or sleep until the client hangs up, one that tries to shed the
 * role and its tenant, and savepoints. Every 200 answers rows the requester must own.
 */
export function addTenantRoutes (app: FastifyInstance, tenants: readonly string[]): void {
  const read = async (request: FastifyRequest): Promise<Row[]> =>
    (await request.db.query<Row>('SELECT tenant, body FROM notes ORDER BY id DESC LIMIT 50')).rows
  app.get('/read', read)
  app.post('/write', async (request) => {
    const tenant = tenantOf(request)
    const { rows } = await request.db.query<Row>('INSERT INTO notes (tenant, body) VALUES ($1, $2) RETURNING tenant, body', [tenant, `w:${tenant}:${request.id}`])
    return [...rows, ...await read(request)]
  })
  app.post('/forge', async (request) => {
    const victim = tenants[(tenants.indexOf(tenantOf(request)) + 1) % tenants.length]
    await request.db.query('INSERT INTO notes (tenant, body) VALUES ($1, $2)', [victim, `f:${tenantOf(request)}:${request.id}`])
    return []
  })
  // Locked in id order: no deadlocks between two of one tenant.
  app.post('/touch-all', async (request) => (await request.db.query<Row>(`UPDATE notes SET body = body
    WHERE id IN (SELECT id FROM notes WHERE body LIKE 'seed:%' ORDER BY id FOR UPDATE) RETURNING tenant, body`)).rows)
  app.get('/throws', async (request) => {
    await read(request)
    throw new Error('the handler failed after reading')
  })
  app.get('/slow', { handlerTimeout: 150 }, async (request) => {
    await request.db.query('SELECT pg_sleep(1)')
    return read(request)
  })
  app.get('/sleepy', async (request) => {
    await request.db.query('SELECT pg_sleep(0.2)')
    return read(request)
  })
  app.get('/escape', async (request) => {
    await request.db.query('RESET ROLE').catch(() => {})
    await request.db.query("SELECT set_config('app.tenant_id', 't0', true)").catch(() => {})
    return read(request)
  })
  app.get('/nested', async (request) => {
    await request.db.transaction(async (tx) => {
      await tx.query('INSERT INTO notes (tenant, body) VALUES ($1, $2)', [tenantOf(request), 'rolled-back'])
      throw new Error('roll back to the savepoint')
    }).catch(() => {})
    return request.db.transaction(async (tx) => (await tx.query<Row>('SELECT tenant, body FROM notes ORDER BY id DESC LIMIT 20')).rows)
  })
  // The negative control: no context, so the login superuser reads past the policies.
  app.get('/control', { config: { db: { context: false } } }, read)
}

// The mix, by weight: the same on every run.
const KINDS: Array<[string, string, number]> = [
  ['GET', '/read', 50], ['POST', '/write', 20], ['POST', '/forge', 5], ['POST', '/touch-all', 3], ['GET', '/throws', 6],
  ['GET', '/slow', 1], ['GET', '/sleepy', 2], ['GET', '/escape', 6], ['GET', '/nested', 7]
]
const WHEEL: Array<[string, string]> = KINDS.flatMap(([method, path, weight]) => Array.from({ length: weight }, () => [method, path] as [string, string]))

export interface LoadFigures {
  requests: number
  seconds: number
  statuses: Record<string, number>
  rowsSeen: number
  /** Rows of another tenant in answers: must be 0. */
  foreignRows: number
  /** Forged writes answered 200: must be 0. */
  forgedAccepted: number
  aborted: number
  kills: number
  writesAnswered: number
}

export interface LoadOptions {
  port: number
  requests: number
  concurrency: number
  tenants: readonly string[]
  /** Kill one of these backends (pids from `backends`) every `killEveryMs`; 0: none. */
  killEveryMs: number
  backends: () => Promise<number[]>
  /** Where pg_terminate_backend runs: an admin connection to the server itself. */
  admin: { query (text: string, values?: unknown[]): Promise<{ rows: any[] }> }
}

/** One request of the mix, over a keep-alive agent; rows in a 200 are checked against the tenant. */
function send (agent: Agent, port: number, method: string, path: string, tenant: string, figures: LoadFigures): Promise<void> {
  return new Promise((resolve) => {
    const req = httpRequest({ port, host: '127.0.0.1', path, method, agent, headers: { 'x-tenant': tenant } }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk) => { text += chunk })
      res.on('error', () => resolve())
      res.on('end', () => {
        const key = `${path} ${res.statusCode ?? 0}`
        figures.statuses[key] = (figures.statuses[key] ?? 0) + 1
        if (res.statusCode === 200) {
          for (const row of JSON.parse(text) as Row[]) {
            figures.rowsSeen++
            if (row.tenant !== tenant) figures.foreignRows++
          }
          if (path === '/forge') figures.forgedAccepted++
          if (path === '/write') figures.writesAnswered++
        }
        resolve()
      })
    })
    req.on('error', () => resolve())
    if (path === '/sleepy') {
      // The client hangs up while the statement runs.
      setTimeout(() => {
        if (!req.destroyed) {
          figures.aborted++
          req.destroy()
        }
      }, 40)
    }
    req.end()
  })
}

/** `requests` requests of the mix from every tenant, interleaved, `concurrency` at a time. */
export async function runTenantLoad (options: LoadOptions): Promise<LoadFigures> {
  const { port, requests, concurrency, tenants } = options
  const agent = new Agent({ keepAlive: true, maxSockets: concurrency })
  const figures: LoadFigures = { requests: 0, seconds: 0, statuses: {}, rowsSeen: 0, foreignRows: 0, forgedAccepted: 0, aborted: 0, kills: 0, writesAnswered: 0 }
  let running = true
  const killer = (async () => {
    if (options.killEveryMs <= 0) return
    while (running) {
      await new Promise((resolve) => setTimeout(resolve, options.killEveryMs))
      const pids = await options.backends().catch(() => [])
      if (pids.length === 0) continue
      const pid = pids[Math.floor(Math.random() * pids.length)]
      const { rows } = await options.admin.query('SELECT pg_terminate_backend($1) AS ok', [pid]).catch(() => ({ rows: [] }))
      if (rows[0]?.ok === true) figures.kills++
    }
  })()
  const started = Date.now()
  let next = 0
  try {
    await Promise.all(Array.from({ length: concurrency }, async () => {
      while (next < requests) {
        const i = next++
        figures.requests++
        const [method, path] = WHEEL[(i * 37) % WHEEL.length]
        await send(agent, port, method, path, tenants[(i * 7 + (i >> 3)) % tenants.length], figures)
      }
    }))
  } finally {
    running = false
    await killer
    agent.destroy()
  }
  figures.seconds = (Date.now() - started) / 1000
  return figures
}

/** The negative control: the same check on a route without a context must find foreign rows. */
export async function controlForeignRows (port: number, tenant: string): Promise<number> {
  const agent = new Agent({ keepAlive: false })
  const figures: LoadFigures = { requests: 0, seconds: 0, statuses: {}, rowsSeen: 0, foreignRows: 0, forgedAccepted: 0, aborted: 0, kills: 0, writesAnswered: 0 }
  await send(agent, port, 'GET', '/control', tenant, figures)
  return figures.foreignRows
}

/** What the table holds afterwards, read as the superuser past the policies. */
export async function storedFigures (db: TestDatabase): Promise<{ foreign_writes: number, writes: number, forged: number, rolled_back: number, moved_seeds: number, seeds: number }> {
  const { rows } = await db.admin.query(`SELECT
      count(*) FILTER (WHERE body LIKE 'w:%' AND split_part(body, ':', 2) <> tenant)::int AS foreign_writes,
      count(*) FILTER (WHERE body LIKE 'w:%')::int AS writes,
      count(*) FILTER (WHERE body LIKE 'f:%')::int AS forged,
      count(*) FILTER (WHERE body = 'rolled-back')::int AS rolled_back,
      count(*) FILTER (WHERE body LIKE 'seed:%' AND split_part(body, ':', 2) <> tenant)::int AS moved_seeds,
      count(*) FILTER (WHERE body LIKE 'seed:%')::int AS seeds
    FROM notes`)
  return rows[0]
}
