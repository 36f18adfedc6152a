// The apps the benchmark compares. Each builds a Fastify app (logger off, pool max 10) whose
// GET /q?n=… route answers { n } from PostgreSQL (or, for the ceilings, without it). Listed in
// the order they run: each variant of this plugin right after the anchor its budget line uses.
import fastifyPostgres from '@fastify/postgres'
import { sql as drizzleSql } from 'drizzle-orm'
import { drizzle } from 'drizzle-orm/node-postgres'
import Fastify from 'fastify'
import { Kysely, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import requestDb from 'fastify-request-db'
import { createDrizzle } from 'fastify-request-db/drizzle'
import requestKysely from 'fastify-request-db/kysely'
import requestDbPrometheus from 'fastify-request-db/prometheus'
import { Registry } from 'prom-client'

const MAX = 10
const ONE = 'SELECT $1::int AS n'

const CONTEXT_ROLE = 'bench_tenant'

/** The role request-db-context switches to: created once on the bench's server. */
async function ensureRole (url, role) {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    await client.query(`DO $$ BEGIN CREATE ROLE ${role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
  } finally {
    await client.end()
  }
}

function intOf (request) {
  return Number(request.query.n) | 0
}

/** @type {Record<string, { anchor: string | null, build: (url: string) => Promise<import('fastify').FastifyInstance> }>} */
export const variants = {
  // Not an anchor of a budget line: the framework's own price of the two hooks this plugin adds to
  // every route (onRequest sets up request.db, onSend commits and gives the client back), to read
  // request-db-noop's ratio against. Runs right before no-db, which runs right before the plugin.
  'fastify-two-hooks': {
    anchor: 'no-db',
    async build () {
      const app = Fastify({ logger: false })
      app.addHook('onRequest', (request, reply, done) => { done() })
      app.addHook('onSend', (request, reply, payload, done) => { done(null, payload) })
      app.get('/q', async (request) => ({ n: intOf(request) }))
      return app
    }
  },
  'no-db': {
    anchor: null,
    async build () {
      const app = Fastify({ logger: false })
      app.get('/q', async (request) => ({ n: intOf(request) }))
      return app
    }
  },
  'request-db-noop': {
    anchor: 'no-db',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/q', async (request) => ({ n: intOf(request) }))
      return app
    }
  },
  'raw-pool': {
    anchor: null,
    async build (url) {
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const app = Fastify({ logger: false })
      app.addHook('onClose', () => pool.end())
      app.get('/q', async (request) => (await pool.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'request-db': {
    anchor: 'raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/q', async (request) => (await request.db.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  // request-db with leak detection and the Prometheus metrics on: what watching the pool costs
  // (npm run bench:instructions counts it against request-db).
  'request-db-observed': {
    anchor: 'raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX, leakDetectionMs: 10_000 })
      await app.register(requestDbPrometheus, { registry: new Registry() })
      app.get('/q', async (request) => (await request.db.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'fastify-postgres': {
    anchor: 'raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(fastifyPostgres, { connectionString: url, max: MAX })
      app.get('/q', async (request) => (await app.pg.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'eager-hooks': {
    anchor: 'raw-pool',
    async build (url) {
      // The seed pattern: a client checked out for every request, given back in onResponse only.
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const app = Fastify({ logger: false })
      app.decorateRequest('client', null)
      app.addHook('onRequest', async (request) => { request.client = await pool.connect() })
      app.addHook('onResponse', async (request) => { request.client.release() })
      app.addHook('onClose', () => pool.end())
      app.get('/q', async (request) => (await request.client.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'fastify-postgres-transact': {
    anchor: 'raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(fastifyPostgres, { connectionString: url, max: MAX })
      app.get('/q', { pg: { transact: true } }, async (request) => (await request.pg.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'request-db-transaction': {
    anchor: 'fastify-postgres-transact',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/q', { config: { db: { transaction: true } } }, async (request) => (await request.db.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  // A database context (#17): the same route, its transaction opened with two settings and a role
  // (BEGIN and set_config in one round trip). The context function is synchronous here: an async
  // one (reading a verified JWT, say) adds its own cost, which is the app's.
  'request-db-context': {
    anchor: 'request-db-transaction',
    async build (url) {
      await ensureRole(url, CONTEXT_ROLE)
      const app = Fastify({ logger: false })
      await app.register(requestDb, {
        connectionString: url,
        max: MAX,
        contextRoles: [CONTEXT_ROLE],
        context: (request) => ({ settings: { 'app.tenant_id': String(intOf(request) % 4), 'app.user_id': request.id }, role: CONTEXT_ROLE })
      })
      app.get('/q', async (request) => (await request.db.query(ONE, [intOf(request)])).rows[0])
      return app
    }
  },
  'raw-pool-3q': {
    anchor: null,
    async build (url) {
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const app = Fastify({ logger: false })
      app.addHook('onClose', () => pool.end())
      app.get('/q', async (request) => {
        const n = intOf(request)
        await pool.query(ONE, [n])
        await pool.query(ONE, [n + 1])
        return (await pool.query(ONE, [n])).rows[0]
      })
      return app
    }
  },
  'request-db-3q': {
    anchor: 'raw-pool-3q',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/q', async (request) => {
        const n = intOf(request)
        await request.db.query(ONE, [n])
        await request.db.query(ONE, [n + 1])
        return (await request.db.query(ONE, [n])).rows[0]
      })
      return app
    }
  },
  // The query builders (#15): the same one-query route written with each, on a module-level
  // pg.Pool (the builder built once) and on request.db (request.kysely, built at first use in each
  // request; Drizzle built per request by createDrizzle).
  'kysely-raw-pool': {
    anchor: null,
    async build (url) {
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const kysely = new Kysely({ dialect: new PostgresDialect({ pool }) })
      const app = Fastify({ logger: false })
      app.addHook('onClose', () => kysely.destroy())
      app.get('/q', async (request) => kysely.selectNoFrom(sql`${intOf(request)}::int`.as('n')).executeTakeFirstOrThrow())
      return app
    }
  },
  'kysely-request-db': {
    anchor: 'kysely-raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      await app.register(requestKysely)
      app.get('/q', async (request) => request.kysely.selectNoFrom(sql`${intOf(request)}::int`.as('n')).executeTakeFirstOrThrow())
      return app
    }
  },
  'drizzle-raw-pool': {
    anchor: null,
    async build (url) {
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const orm = drizzle({ client: pool })
      const app = Fastify({ logger: false })
      app.addHook('onClose', () => pool.end())
      app.get('/q', async (request) => (await orm.execute(drizzleSql`SELECT ${intOf(request)}::int AS n`)).rows[0])
      return app
    }
  },
  'drizzle-request-db': {
    anchor: 'drizzle-raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/q', async (request) => (await createDrizzle(request.db).execute(drizzleSql`SELECT ${intOf(request)}::int AS n`)).rows[0])
      return app
    }
  }
}
