// npm run soak -- --duration 60 [--connections 200] [--max 10]
//
// Drives the app in soak/app.js over real sockets with a mixed workload while injecting faults into
// a real PostgreSQL, then checks the invariants and prints them as a table. Exits 1 if one fails.
// Faults, in turn: pg_terminate_backend of random app backends; a lock that exhausts the pool;
// a full server restart (stop, wait, start: only on the embedded server it started itself).
import { fork } from 'node:child_process'
import { cpus } from 'node:os'
import { parseArgs } from 'node:util'
import pg from 'pg'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'

const { values: args } = parseArgs({
  options: {
    duration: { type: 'string', default: '60' },
    connections: { type: 'string', default: '200' },
    max: { type: 'string', default: '10' }
  }
})
const duration = Number(args.duration) * 1000
const connections = Number(args.connections)
const max = Number(args.max)
const APP_NAME = 'soak-app'
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const log = (...a) => process.stderr.write(`[soak ${((Date.now() - t0) / 1000).toFixed(1)}s] ${a.join(' ')}\n`)
let t0 = Date.now()

// ---- the database ---------------------------------------------------------------------------
let server = null
let baseUrl = process.env.DATABASE_URL
if (!baseUrl) {
  log('starting an embedded PostgreSQL')
  try {
    server = await startEmbeddedPostgres()
  } catch (err) {
    // Its message says what failed and what to do; a stack adds nothing.
    console.error(err.name === 'EmbeddedPostgresError' ? err.message : err)
    process.exit(1)
  }
  baseUrl = server.url
}
const admin = new pg.Pool({ connectionString: baseUrl, max: 2 })
admin.on('error', () => {})
const dbName = `soak_${Date.now()}`
await admin.query(`CREATE DATABASE ${dbName}`)
const dbUrl = new URL(baseUrl)
dbUrl.pathname = `/${dbName}`
const dbAdmin = new pg.Pool({ connectionString: dbUrl.toString(), max: 3 })
dbAdmin.on('error', () => {})
await dbAdmin.query('CREATE TABLE soak_writes (id text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())')
dbUrl.searchParams.set('application_name', APP_NAME)

// ---- the app --------------------------------------------------------------------------------
const child = fork(new URL('./app.js', import.meta.url), [], {
  env: { ...process.env, DATABASE_URL: dbUrl.toString(), SOAK_POOL_MAX: String(max) },
  stdio: ['ignore', 'inherit', 'inherit', 'ipc']
})
const messages = []
const waiters = []
child.on('message', (m) => { const w = waiters.shift(); if (w) w(m); else messages.push(m) })
const nextMessage = () => messages.length ? Promise.resolve(messages.shift()) : new Promise((resolve) => waiters.push(resolve))
let appExited = null
let closeRequested = false
child.on('exit', (code, signal) => { if (!closeRequested) appExited = { code, signal } })
const ready = await nextMessage()
const base = `http://127.0.0.1:${ready.port}`
const askStats = async () => { child.send('stats'); return nextMessage() }

// ---- load -----------------------------------------------------------------------------------
const statusCounts = new Map()
const latencies = new Map()
const writes = new Map() // id -> HTTP status, or 'no answer'
let seq = 0
let lastSuccessAt = 0
let serverUpAt = null
const recoveries = []

function record (route, status, ms) {
  statusCounts.set(status, (statusCounts.get(status) ?? 0) + 1)
  if (!latencies.has(route)) latencies.set(route, [])
  latencies.get(route).push(ms)
  if (typeof status === 'number' && status >= 200 && status < 300) {
    const now = Date.now()
    lastSuccessAt = now
    if (serverUpAt !== null) {
      recoveries.push((now - serverUpAt) / 1000)
      serverUpAt = null
    }
  }
}

async function hit (route, path, { method = 'GET', abortAfter, writeId } = {}) {
  const started = Date.now()
  let status
  try {
    const signal = AbortSignal.timeout(abortAfter ?? 15_000)
    const res = await fetch(base + path, { method, signal })
    const body = await res.text()
    status = res.status
    if (status === 503) {
      const code = body.startsWith('{') ? JSON.parse(body).code : undefined
      if (code === 'FST_ERR_HANDLER_TIMEOUT') status = '503 handlerTimeout (Fastify)'
      else if (!res.headers.get('retry-after')) status = `503 without Retry-After (${code})`
      else status = `503 ${code}`
    }
  } catch (err) {
    status = abortAfter !== undefined && err.name === 'TimeoutError' ? 'aborted by client' : 'no answer'
  }
  if (writeId !== undefined) writes.set(writeId, status)
  record(route, status, Date.now() - started)
}

let end = 0 // set when the load starts
async function worker () {
  while (Date.now() < end && appExited === null) {
    const r = Math.random()
    if (r < 0.45) await hit('GET /read', '/read')
    else if (r < 0.70) { const id = `w${seq++}`; await hit('POST /write', `/write/${id}`, { method: 'POST', writeId: id }) }
    else if (r < 0.78) { const id = `t${seq++}`; await hit('POST /write-then-throw', `/write-then-throw/${id}`, { method: 'POST', writeId: id }) }
    else if (r < 0.90) await hit('GET /slow (client aborts)', '/slow', { abortAfter: 50 })
    else if (r < 0.95) await hit('GET /too-slow (handlerTimeout)', '/too-slow')
    else await hit('GET /slow', '/slow')
  }
}

// ---- faults and sampling --------------------------------------------------------------------
const faults = { 'terminate backends': 0, 'exhaust pool (table lock)': 0, 'restart PostgreSQL': 0 }
let maxBackends = 0
let sampling = true
const sampler = (async () => {
  while (sampling) {
    try {
      const { rows } = await admin.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1', [APP_NAME])
      maxBackends = Math.max(maxBackends, rows[0].n)
    } catch {}
    await sleep(100)
  }
})()

async function terminate () {
  const { rows } = await admin.query(`SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
    WHERE application_name = $1 ORDER BY random() LIMIT 3`, [APP_NAME])
  log(`terminated ${rows.length} app backends`)
}
async function exhaust () {
  const client = await dbAdmin.connect()
  try {
    await client.query('BEGIN')
    await client.query('LOCK TABLE soak_writes IN ACCESS EXCLUSIVE MODE')
    log('table locked: the pool fills with blocked requests')
    await sleep(2500)
    await client.query('COMMIT')
  } finally {
    client.release()
  }
}
async function restart () {
  log('stopping PostgreSQL')
  await server.stopServer()
  await sleep(1500)
  await server.startServer()
  serverUpAt = Date.now()
  log('PostgreSQL is back')
}
const kinds = [['terminate backends', terminate], ['exhaust pool (table lock)', exhaust]]
if (server) kinds.push(['restart PostgreSQL', restart])
const faultEvery = Math.max(3000, Math.floor(duration / (kinds.length * 3 + 1)))
async function injectFaults () {
  // On a fixed schedule (fault i at (i + 1) × faultEvery), so a slow fault doesn't push the
  // later ones out of a short run.
  for (let i = 0; ; i++) {
    const at = t0 + (i + 1) * faultEvery
    if (at + 2000 >= end) break
    await sleep(Math.max(0, at - Date.now()))
    const [name, inject] = kinds[i % kinds.length]
    try {
      await inject()
      faults[name]++
    } catch (err) {
      log(`fault ${name} failed: ${err.message}`)
    }
  }
}

log(`load: ${connections} connections for ${duration / 1000} s, pool max ${max}, a fault every ${faultEvery / 1000} s`)
t0 = Date.now()
end = t0 + duration
await Promise.all([...Array.from({ length: connections }, worker), injectFaults()])
const loadEnded = Date.now()
log('load stopped')

// ---- invariants ------------------------------------------------------------------------------
let leased = null
for (let i = 0; i < 50 && appExited === null; i++) {
  const { stats } = await askStats()
  leased = stats.leased
  if (leased === 0) break
  await sleep(100)
}
const leaseSettleMs = Date.now() - loadEnded

const { rows: stored } = await dbAdmin.query('SELECT id FROM soak_writes')
const inDb = new Set(stored.map((r) => r.id))
let lost = 0
let phantom = 0
let unanswered = 0
let acknowledged = 0
for (const [id, status] of writes) {
  const code = typeof status === 'number' ? status : Number.parseInt(status, 10)
  if (Number.isNaN(code)) { unanswered++; continue }
  if (code >= 200 && code < 300) {
    acknowledged++
    if (!inDb.has(id)) lost++
  } else if (inDb.has(id)) {
    phantom++
    log(`write ${id} answered ${status} but is in the database`)
  }
}

closeRequested = true
const closed = appExited === null ? (child.send('close'), await nextMessage()) : { ms: NaN, peakRss: NaN }
sampling = false
await sampler
let backendsAfterClose = null
for (let i = 0; i < 20; i++) {
  const { rows } = await admin.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1', [APP_NAME])
  backendsAfterClose = rows[0].n
  if (backendsAfterClose === 0) break
  await sleep(100)
}

await dbAdmin.end()
await admin.query(`DROP DATABASE ${dbName} WITH (FORCE)`).catch(() => {})
await admin.end()
if (server) await server.stop()

// ---- report ----------------------------------------------------------------------------------
const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : NaN }
const noRetryAfter = [...statusCounts].filter(([s]) => String(s).startsWith('503 without')).reduce((a, [, n]) => a + n, 0)
const invariants = [
  ['app process alive throughout', appExited === null ? 'yes' : `exited ${JSON.stringify(appExited)}`, appExited === null],
  ['leased clients after the load stopped', `${leased} (after ${leaseSettleMs} ms)`, leased === 0],
  [`max app backends during the run (pool max ${max})`, String(maxBackends), maxBackends <= max],
  ['app backends after close()', String(backendsAfterClose), backendsAfterClose === 0],
  ['writes answered 2xx but missing from the database', `${lost} of ${acknowledged}`, lost === 0],
  ['writes answered non-2xx but in the database', String(phantom), phantom === 0],
  ['plugin 503s without Retry-After', String(noRetryAfter), noRetryAfter === 0],
  ['close() returned within shutdownTimeoutMs (3 s) + 2 s', `${closed.ms} ms`, closed.ms <= 5000],
  ...Object.entries(faults).filter(([name]) => server || name !== 'restart PostgreSQL')
    .map(([name, n]) => [`fault injected: ${name}`, `${n} times`, n >= 1])
]
let md = `## Soak run\n\n${new Date().toISOString().slice(0, 19)}Z · Node ${process.version} · ${cpus().length} cores · ` +
  `${connections} connections for ${duration / 1000} s · pool max ${max} · ${server ? 'embedded PostgreSQL' : 'DATABASE_URL'}\n\n` +
  '| invariant | measured | ok |\n|---|---|---|\n' +
  invariants.map(([k, v, ok]) => `| ${k} | ${v} | ${ok ? 'yes' : '**NO**'} |`).join('\n') + '\n\n' +
  '| figure | value |\n|---|---|\n' +
  `| recovery after restart (s, each) | ${recoveries.length ? recoveries.map((r) => r.toFixed(2)).join(', ') : '–'} |\n` +
  `| writes with no HTTP answer (client gave up / connection cut) | ${unanswered} |\n` +
  `| app peak RSS | ${(closed.peakRss / 1048576).toFixed(0)} MB |\n\n` +
  '| status | requests |\n|---|---:|\n' +
  [...statusCounts].sort((a, b) => String(a[0]).localeCompare(String(b[0]))).map(([s, n]) => `| ${s} | ${n} |`).join('\n') + '\n\n' +
  '| route | requests | p50 ms | p99 ms |\n|---|---:|---:|---:|\n' +
  [...latencies].map(([route, xs]) => `| ${route} | ${xs.length} | ${pct(xs, 0.5)} | ${pct(xs, 0.99)} |`).join('\n') + '\n'
console.log(md)
const failed = invariants.filter(([, , ok]) => !ok)
if (failed.length) {
  console.log(`FAILED: ${failed.map(([k]) => k).join('; ')}`)
  process.exit(1)
}
console.log('All invariants held.')
