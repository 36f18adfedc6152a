#!/usr/bin/env node
// How many app instances × pool size one PostgreSQL serves, with and without PgBouncer
// (docs/scaling.md). Starts its own PostgreSQL (max_connections set here, so the connection budget
// is the one asked for), a PgBouncer in transaction mode in front of it, then for each instance
// count a fleet of app processes (bench/scaling-app.js) straight on the server and through
// PgBouncer (`pooler: 'transaction'`), in alternating order, round after round.
//   npm run bench:scaling -- [--instances 1,4,16] [--pool 10] [--max-connections 100]
//     [--bouncer-pool 20] [--connections 64] [--seconds 8] [--warmup 2] [--rounds 2] [--path /q]
// --path /q: an indexed lookup (the server's CPU sets the pace); /wait: pg_sleep(0.005) (the
// number of server connections does).
import { parseArgs } from 'node:util'
import pg from 'pg'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'
import { pgbouncerMissing, startPgBouncer } from '../scripts/pgbouncer.mjs'
import { load, startFleet } from './fleet.js'
import { median } from './median.js'

const { values: args } = parseArgs({
  options: {
    instances: { type: 'string', default: '1,4,16' },
    pool: { type: 'string', default: '10' },
    'max-connections': { type: 'string', default: '100' },
    'bouncer-pool': { type: 'string', default: '20' },
    connections: { type: 'string', default: '64' },
    seconds: { type: 'string', default: '8' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '2' },
    path: { type: 'string', default: '/q' }
  }
})
const instanceCounts = args.instances.split(',').map(Number)
const pool = Number(args.pool)
const maxConnections = Number(args['max-connections'])
const bouncerPool = Number(args['bouncer-pool'])
const connections = Number(args.connections)
const seconds = Number(args.seconds)
const warmup = Number(args.warmup)
const rounds = Number(args.rounds)

const server = await startEmbeddedPostgres({ maxConnections })
const admin = new pg.Client({ connectionString: server.url })
await admin.connect()
await admin.query('CREATE DATABASE bench')
const direct = new URL(server.url)
direct.pathname = '/bench'
const setup = new pg.Client({ connectionString: direct.toString() })
await setup.connect()
await setup.query("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 1000) i")
await setup.end()

const missing = pgbouncerMissing()
const bouncer = missing === null
  ? await startPgBouncer({ target: { host: server.host, port: server.port, user: server.user, password: server.password }, poolMode: 'transaction', poolSize: bouncerPool, maxClientConn: 4000 })
  : null
if (bouncer === null) console.error(`PgBouncer rows not run: ${missing}`)
const through = bouncer === null ? null : new URL(bouncer.url)
if (through !== null) through.pathname = '/bench'

const modes = [
  { name: 'direct', env: { DATABASE_URL: direct.toString(), DB_POOLER: 'none' } },
  ...(through === null ? [] : [{ name: 'PgBouncer', env: { DATABASE_URL: through.toString(), DB_POOLER: 'transaction' } }])
]

/** Server backends of the bench database, sampled while the load runs: the highest seen. */
async function peakBackends (until) {
  let peak = 0
  while (!until.done) {
    const { rows } = await admin.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = 'bench' AND backend_type = 'client backend'")
    peak = Math.max(peak, rows[0].n)
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  return peak
}

async function runOne (instances, mode) {
  // PgBouncer's server connections from the run before would count as this run's backends.
  await bouncer?.restart()
  const fleet = await startFleet(instances, { ...mode.env, DB_POOL_MAX: String(pool), DB_ACQUIRE_TIMEOUT_MS: '2000', DB_IDLE_TIMEOUT_MS: '10000' })
  try {
    await load(fleet, { path: args.path, connections, seconds: warmup })
    const until = { done: false }
    const peak = peakBackends(until)
    const result = await load(fleet, { path: args.path, connections, seconds })
    until.done = true
    return { ...result, backends: await peak }
  } finally {
    await fleet.stop()
    // Let the server see the old fleet's connections close before the next one starts.
    for (let i = 0; i < 50; i++) {
      const { rows } = await admin.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = 'bench' AND backend_type = 'client backend'")
      if (rows[0].n === 0) break
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
}

const samples = new Map()
const started = Date.now()
for (let round = 0; round < rounds; round++) {
  for (const instances of instanceCounts) {
    const order = round % 2 === 0 ? modes : [...modes].reverse()
    for (const mode of order) {
      const key = `${instances}|${mode.name}`
      const result = await runOne(instances, mode)
      ;(samples.get(key) ?? samples.set(key, []).get(key)).push(result)
      console.error(`round ${round + 1}: ${instances} × ${mode.name}: ${Math.round(result.rps)} req/s, p99 ${result.p99} ms, non-2xx ${Math.round(result.badPerSecond)}/s, errors ${Math.round(result.errorsPerSecond)}/s, backends ≤ ${result.backends}`)
    }
  }
}

const lines = [
  `Node ${process.version} · ${(await import('node:os')).cpus().length} cores · PostgreSQL max_connections ${maxConnections} · app pool max ${pool} per instance · ` +
    `PgBouncer 1.x pool_mode=transaction, default_pool_size ${bouncerPool} · ${connections} HTTP connections in all, spread over the instances · ` +
    `route ${args.path} · ${rounds} rounds of ${seconds} s (after ${warmup} s warm-up), modes alternating · all on loopback, load from autocannon in the parent process · ${Math.round((Date.now() - started) / 1000)} s`,
  '',
  '| instances | via | wanted connections | server backends (peak) | req/s (2xx) | non-2xx/s | p99 ms |',
  '|---:|---|---:|---:|---:|---:|---:|'
]
for (const instances of instanceCounts) {
  for (const mode of modes) {
    const runs = samples.get(`${instances}|${mode.name}`)
    const m = (pick) => median(runs.map(pick))
    lines.push(`| ${instances} | ${mode.name} | ${instances * pool} | ${m((r) => r.backends)} | ${Math.round(m((r) => r.rps))} | ${Math.round(m((r) => r.badPerSecond + r.errorsPerSecond))} | ${m((r) => r.p99)} |`)
  }
}
console.log(lines.join('\n'))

await bouncer?.stop()
await admin.end()
await server.stop()
