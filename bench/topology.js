#!/usr/bin/env node
// The same one-query route straight on PostgreSQL and through PgBouncer (`pooler: 'transaction'`),
// and a read-only route on a streaming replica beside the plain route on the primary, interleaved
// in one run (bench/README.md, "PgBouncer and replicas"). Starts its own primary, a replica of it
// (scripts/replica.mjs) and a PgBouncer in transaction mode; each run is one fresh app process.
//   npm run bench:topology -- [--connections 32] [--seconds 5] [--warmup 2] [--rounds 4] [--pool 10]
import { parseArgs } from 'node:util'
import pg from 'pg'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'
import { pgbouncerMissing, startPgBouncer } from '../scripts/pgbouncer.mjs'
import { startReplica } from '../scripts/replica.mjs'
import { load, startFleet } from './fleet.js'
import { median } from './median.js'

const { values: args } = parseArgs({
  options: {
    connections: { type: 'string', default: '32' },
    seconds: { type: 'string', default: '5' },
    warmup: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '4' },
    pool: { type: 'string', default: '10' }
  }
})
const connections = Number(args.connections)
const seconds = Number(args.seconds)
const warmup = Number(args.warmup)
const rounds = Number(args.rounds)

const primary = await startEmbeddedPostgres({ maxConnections: 100 })
const admin = new pg.Client({ connectionString: primary.url })
await admin.connect()
await admin.query('CREATE DATABASE bench')
const on = (url, database = 'bench') => {
  const u = new URL(url)
  u.pathname = `/${database}`
  return u.toString()
}
const setup = new pg.Client({ connectionString: on(primary.url) })
await setup.connect()
await setup.query("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 1000) i")
await setup.end()
const replica = await startReplica(primary)
// The replica has the table once it has replayed its creation.
const probe = new pg.Client({ connectionString: on(replica.url) })
for (let i = 0; ; i++) {
  try {
    if (probe._connected !== true) await probe.connect()
    if ((await probe.query("SELECT to_regclass('public.items') AS t")).rows[0].t !== null) break
  } catch {}
  if (i > 100) throw new Error('the replica never got the table')
  await new Promise((resolve) => setTimeout(resolve, 100))
}
await probe.end()
const missing = pgbouncerMissing()
const bouncer = missing === null
  ? await startPgBouncer({ target: { host: primary.host, port: primary.port, user: primary.user, password: primary.password }, poolMode: 'transaction', poolSize: 20 })
  : null
if (bouncer === null) console.error(`PgBouncer lines not run: ${missing}`)

const base = { DB_POOL_MAX: args.pool, DB_IDLE_TIMEOUT_MS: '10000' }
const variants = [
  { name: 'direct', path: '/q', env: { ...base, DATABASE_URL: on(primary.url) } },
  ...(bouncer === null ? [] : [{ name: 'pgbouncer', path: '/q', env: { ...base, DATABASE_URL: on(bouncer.url), DB_POOLER: 'transaction' } }]),
  { name: 'primary-route', path: '/q', env: { ...base, DATABASE_URL: on(primary.url), DATABASE_REPLICA_URLS: on(replica.url) } },
  { name: 'replica-route', path: '/ro', env: { ...base, DATABASE_URL: on(primary.url), DATABASE_REPLICA_URLS: on(replica.url) } }
]

const samples = new Map(variants.map((v) => [v.name, []]))
const started = Date.now()
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? variants : [...variants].reverse()
  for (const variant of order) {
    const fleet = await startFleet(1, variant.env)
    try {
      await load(fleet, { path: variant.path, connections, seconds: warmup })
      const result = await load(fleet, { path: variant.path, connections, seconds })
      samples.get(variant.name).push(result)
      console.error(`round ${round + 1}: ${variant.name}: ${Math.round(result.rps)} req/s, p99 ${result.p99} ms, non-2xx ${Math.round(result.badPerSecond)}/s`)
    } finally {
      await fleet.stop()
    }
  }
}

const ratio = (a, b) => median(samples.get(a).map((r, i) => r.rps / samples.get(b)[i].rps))
const lines = [
  `Node ${process.version} · ${(await import('node:os')).cpus().length} cores · one app process per run, pool max ${args.pool} · ${connections} connections · ` +
    `${rounds} interleaved rounds of ${seconds} s (after ${warmup} s warm-up), order reversed every other round · primary, streaming replica and PgBouncer (pool_mode=transaction, default_pool_size 20) on loopback · ${Math.round((Date.now() - started) / 1000)} s`,
  '',
  '| variant | route | req/s (median) | p99 ms (median) | non-2xx/s |',
  '|---|---|---:|---:|---:|'
]
for (const variant of variants) {
  const runs = samples.get(variant.name)
  lines.push(`| ${variant.name} | ${variant.path} | ${Math.round(median(runs.map((r) => r.rps)))} | ${median(runs.map((r) => r.p99))} | ${Math.round(median(runs.map((r) => r.badPerSecond + r.errorsPerSecond)))} |`)
}
lines.push('')
if (bouncer !== null) lines.push(`PgBouncer / direct, req/s, median of per-round ratios: ${ratio('pgbouncer', 'direct').toFixed(3)}`)
lines.push(`replica route / primary route, req/s, median of per-round ratios: ${ratio('replica-route', 'primary-route').toFixed(3)}`)
console.log(lines.join('\n'))

await bouncer?.stop()
await replica.stop()
await admin.end()
await primary.stop()
