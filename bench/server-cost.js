// npm run bench:server: what the server spends on a route transaction, with and without a database
// context (#17), as the plugin writes it. One connection; each shape's transactions are written
// back to back (200 per write, a few MB at most), so the backend never waits for the client and its
// CPU time (from /proc, Linux) is the statements' own, not the wake-ups between round trips, which
// are the same for every shape (three round trips each). Shapes interleave, several rounds; the
// figure is the median µs of backend CPU per transaction.
//
// Options: --transactions N (20000 per shape and round), --rounds N (5).
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import pg from 'pg'
import { BeginWithContext, contextShape } from '../dist/esm/context-statement.js'
import { median } from './median.js'

const { values: args } = parseArgs({
  options: { transactions: { type: 'string', default: '20000' }, rounds: { type: 'string', default: '5' } }
})
const transactions = Number(args.transactions)
const rounds = Number(args.rounds)
const url = process.env.DATABASE_URL
if (!url) throw new Error('DATABASE_URL is not set: run through `npm run bench:server`')
const ROLE = 'bench_tenant'

// The protocol's messages (https://www.postgresql.org/docs/current/protocol-message-formats.html).
function message (type, body) {
  const head = Buffer.allocUnsafe(5)
  head.write(type, 0, 'latin1')
  head.writeInt32BE(body.length + 4, 1)
  return Buffer.concat([head, body])
}
const cString = (text) => Buffer.from(`${text}\0`)
const int16 = (n) => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b }
const int32 = (n) => { const b = Buffer.alloc(4); b.writeInt32BE(n); return b }
const simple = (text) => message('Q', cString(text))
// The handler's statement as pg sends one with values: Parse, Bind, Describe, Execute, Sync.
const statement = (n) => {
  const value = Buffer.from(String(n))
  return Buffer.concat([
    message('P', Buffer.concat([cString(''), cString('SELECT $1::int AS n'), int16(0)])),
    message('B', Buffer.concat([cString(''), cString(''), int16(0), int16(1), int32(value.length), value, int16(0)])),
    message('D', Buffer.concat([Buffer.from('P'), cString('')])),
    message('E', Buffer.concat([cString(''), int32(0)])),
    message('S', Buffer.alloc(0))
  ])
}

// The plugin's own BEGIN-with-context batch, captured from what it would write to pg's connection.
const values = ['app.tenant_id', '3', 'app.user_id', 'req-1a2b', ROLE]
function contextBatch (prepare, connection) {
  let written = null
  const batch = new BeginWithContext(contextShape(2, true), values, prepare)
  connection._send = (buffer) => { written = buffer; return true }
  batch.submit(connection)
  batch.handleReadyForQuery()
  return written
}
const preparedOn = {}
const firstPrepared = contextBatch(true, preparedOn) // with the Parses: sent once, below
const shapes = {
  'plain route transaction (BEGIN, statement, COMMIT)': simple('BEGIN'),
  'context, unnamed (pooler: transaction)': contextBatch(false, {}),
  'context, prepared (direct connection)': contextBatch(true, preparedOn)
}

const setup = new pg.Client({ connectionString: url })
await setup.connect()
await setup.query(`DO $$ BEGIN CREATE ROLE ${ROLE} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
await setup.end()

// A connection pg opened (and authenticated), then read by hand: only ReadyForQuery and
// ErrorResponse are counted.
const client = new pg.Client({ connectionString: url })
await client.connect()
const pid = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
const socket = client.connection.stream
socket.removeAllListeners('data')
let pending = Buffer.alloc(0)
let ready = 0
let errors = 0
let waiter = null
socket.on('data', (data) => {
  pending = pending.length > 0 ? Buffer.concat([pending, data]) : data
  let at = 0
  while (pending.length - at >= 5) {
    const length = pending.readInt32BE(at + 1)
    if (pending.length - at < length + 1) break
    if (pending[at] === 0x5a) ready++ // 'Z'
    else if (pending[at] === 0x45) errors++ // 'E'
    at += length + 1
  }
  pending = pending.subarray(at)
  if (waiter !== null && ready >= waiter.until) {
    const { resolve } = waiter
    waiter = null
    resolve()
  }
})
function send (buffer, replies) {
  const until = ready + replies
  return new Promise((resolve) => {
    waiter = { until, resolve }
    socket.write(buffer)
  })
}
function backendMicros () {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return (Number(fields[11]) + Number(fields[12])) * 10_000
}

await send(firstPrepared, 1)
await send(simple('ROLLBACK'), 1)
const COMMIT = simple('COMMIT')
const PER_WRITE = 200
const results = {}
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? Object.entries(shapes) : Object.entries(shapes).reverse()
  for (const [name, begin] of order) {
    const before = backendMicros()
    for (let i = 0; i < transactions; i += PER_WRITE) {
      const parts = []
      for (let j = 0; j < PER_WRITE; j++) parts.push(begin, statement(i + j), COMMIT)
      await send(Buffer.concat(parts), PER_WRITE * 3)
    }
    ;(results[name] ??= []).push((backendMicros() - before) / transactions)
  }
}
// pg would report the socket's end as an error nobody listens to.
client.on('error', () => {})
socket.destroy()
if (errors > 0) throw new Error(`the server answered ${errors} errors: the figures are not the statements'`)

const plain = median(Object.values(results)[0])
let md = `| shape | backend CPU µs/transaction (median of ${rounds}) | rounds | vs plain |\n|---|---:|---|---:|\n`
for (const [name, runs] of Object.entries(results)) {
  md += `| ${name} | ${median(runs).toFixed(1)} | ${runs.map((r) => r.toFixed(1)).join(', ')} | ${(median(runs) / plain).toFixed(2)} |\n`
}
process.stdout.write(md)
