// npm run bench:builders: the table of issue #15, measured again. For each way of putting a query
// builder on the request's connection: backends used by 200 requests of two queries each (pool max
// 10), whether both queries of every request ran on one backend, and ms per request. Requests run
// one after another (--concurrency N to change that), through app.inject, after --warmup requests
// that are not counted (the JIT's first calls). Prints a Markdown table.
import { parseArgs } from 'node:util'
import { sql as drizzleSql } from 'drizzle-orm'
import { drizzle } from 'drizzle-orm/node-postgres'
import Fastify from 'fastify'
import { Kysely, PostgresDialect, sql } from 'kysely'
import pg from 'pg'
import requestDb from 'fastify-request-db'
import { createDrizzle } from 'fastify-request-db/drizzle'
import requestKysely from 'fastify-request-db/kysely'

const { values: args } = parseArgs({ options: { requests: { type: 'string', default: '200' }, concurrency: { type: 'string', default: '1' }, warmup: { type: 'string', default: '50' } } })
const REQUESTS = Number(args.requests)
const CONCURRENCY = Number(args.concurrency)
const WARMUP = Number(args.warmup)
const MAX = 10
if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set: run through `npm run bench:builders`')

const pidQuery = sql`SELECT pg_backend_pid() AS pid`
const kyselyPids = async (kysely) => [(await pidQuery.execute(kysely)).rows[0].pid, (await pidQuery.execute(kysely)).rows[0].pid]
const drizzlePid = drizzleSql`SELECT pg_backend_pid() AS pid`
const drizzlePids = async (orm) => [(await orm.execute(drizzlePid)).rows[0].pid, (await orm.execute(drizzlePid)).rows[0].pid]

// Each: how the route gets its builder. `pool`: a module-level pg.Pool instead of the plugin.
const ways = [
  ['Kysely, pool: { connect: () => request.db.client() } (before #15)', (request) =>
    kyselyPids(new Kysely({ dialect: new PostgresDialect({ pool: { connect: () => request.db.client(), end: async () => {} } }) }))],
  ['Kysely, new PostgresDialect({ pool: request.db }) per request', (request) =>
    kyselyPids(new Kysely({ dialect: new PostgresDialect({ pool: request.db }) }))],
  ['Kysely, request.kysely (fastify-request-db/kysely)', (request) => kyselyPids(request.kysely)],
  ['Kysely on a module-level pg.Pool (for scale)', null, (pool) => {
    const kysely = new Kysely({ dialect: new PostgresDialect({ pool }) })
    return () => kyselyPids(kysely)
  }],
  ['Drizzle, drizzle({ client: request.db })', (request) => drizzlePids(drizzle({ client: request.db }))],
  ['Drizzle, createDrizzle(request.db) (fastify-request-db/drizzle)', (request) => drizzlePids(createDrizzle(request.db))],
  ['Drizzle on a module-level pg.Pool (for scale)', null, (pool) => {
    const orm = drizzle({ client: pool })
    return () => drizzlePids(orm)
  }]
]

async function measure (route, onPool) {
  const app = Fastify({ logger: false })
  let pool
  let connections = 0
  if (onPool === undefined) {
    await app.register(requestDb, { connectionString: process.env.DATABASE_URL, max: MAX })
    await app.register(requestKysely)
    pool = app.db.pool
    app.get('/', route)
  } else {
    pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: MAX })
    app.addHook('onClose', () => pool.end())
    app.get('/', onPool(pool))
  }
  await app.ready()
  for (let i = 0; i < WARMUP; i++) await app.inject('/')
  // Counted from here, after the warm-up (and the plugin's startup check, which opened one).
  pool.on('connect', () => { connections++ })
  const pids = []
  const started = process.hrtime.bigint()
  for (let sent = 0; sent < REQUESTS; sent += CONCURRENCY) {
    const batch = Array.from({ length: Math.min(CONCURRENCY, REQUESTS - sent) }, () => app.inject('/'))
    for (const res of await Promise.all(batch)) {
      if (res.statusCode !== 200) throw new Error(`${res.statusCode} ${res.body}`)
      pids.push(res.json())
    }
  }
  const ms = Number(process.hrtime.bigint() - started) / 1e6
  await app.close()
  return {
    backends: new Set(pids.flat()).size,
    opened: connections,
    oneBackend: pids.filter(([a, b]) => a === b).length,
    msPerRequest: ms / REQUESTS
  }
}

let table = `| way | backends used (distinct pids) | connections opened | requests with both queries on one backend | ms per request |\n|---|---:|---:|---:|---:|\n`
for (const [name, route, onPool] of ways) {
  const r = await measure(route, onPool ?? undefined)
  table += `| ${name} | ${r.backends} | ${r.opened} | ${r.oneBackend} / ${REQUESTS} | ${r.msPerRequest.toFixed(2)} |\n`
  process.stderr.write(`${name}: done\n`)
}
console.log(`${REQUESTS} requests of two queries each (after ${WARMUP} not counted), ${CONCURRENCY} at a time, pool max ${MAX}, Node ${process.version}\n\n${table}`)
