// The plugin's work as the tools users trace with see it (#20), with the real @fastify/otel and
// @opentelemetry/instrumentation-pg: every statement the plugin sends for a request (BEGIN, COMMIT,
// ROLLBACK, the reset of a transaction a hang-up left open, savepoints), every cancel request and
// every log line it writes about a request sits in that request's trace and in no other, under 50
// concurrent requests that commit, fail, hang up and time out. The pool's own timers run in no
// request's context. Then the pool's metrics: named after the configured host, port and database.
//
// instrumentation-pg patches pg as it is loaded: the SDK and the instrumentations are set up here,
// before anything imports pg, and everything that does is imported afterwards.
import { createHook } from 'node:async_hooks'
import diagnostics from 'node:diagnostics_channel'
import { createRequire } from 'node:module'
import type { Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { FastifyOtelInstrumentation } from '@fastify/otel'
import { type Context, context, trace } from '@opentelemetry/api'
import { PgInstrumentation } from '@opentelemetry/instrumentation-pg'
import { type MetricData, MeterProvider, MetricReader } from '@opentelemetry/sdk-metrics'
import { InMemorySpanExporter, type ReadableSpan, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node'
import type { Client } from 'pg'
import t from 'tap'

const exporter = new InMemorySpanExporter()
const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
// Registers the AsyncLocalStorage context manager, as an app's tracing setup does.
provider.register()

// Which connection sent a statement: instrumentation-pg's requestHook is not told, so a wrapper
// around the instrumented Client.prototype.query (installed below) notes the client, and the hook
// writes it on the statement's span.
let sending: { processID?: number | null } | null = null
const clientIds = new WeakMap<object, number>()
let nextClientId = 0
const pgInstrumentation = new PgInstrumentation({
  requestHook (span) {
    if (sending === null) return
    let id = clientIds.get(sending)
    if (id === undefined) clientIds.set(sending, id = ++nextClientId)
    span.setAttribute('test.client', id)
    span.setAttribute('test.pid', sending.processID ?? -1)
  }
})
pgInstrumentation.setTracerProvider(provider)
const fastifyOtel = new FastifyOtelInstrumentation()
fastifyOtel.setTracerProvider(provider)

// Loaded with require() as @fastify/postgres does, so that every hook of the instrumentation has
// patched pg before the wrapper goes around it (a later first require() would patch it again).
const pg = createRequire(import.meta.url)('pg') as typeof import('pg')
const instrumentedQuery = pg.Client.prototype.query
pg.Client.prototype.query = function (this: Client, ...args: unknown[]) {
  sending = this as never
  try {
    return (instrumentedQuery as (...a: unknown[]) => unknown).apply(this, args)
  } finally {
    sending = null
  }
} as never
const { default: Fastify } = await import('fastify')
const { default: QueryStream } = await import('pg-query-stream')
const { default: requestDb } = await import('../lib/index.js')
const { appBackends, createDatabase, waitFor } = await import('./helpers/db.js')
const { get, getOnOwnSocket, listen } = await import('./helpers/http.js')
const { ndjson, readThenHangUp } = await import('./helpers/streams.js')
const { to: copyTo } = await import('pg-copy-streams')

function traceIdOf (ctx: Context): string | undefined {
  return trace.getSpan(ctx)?.spanContext().traceId
}

// The trace that was active where each timer was armed: a timer runs its callback there.
const armedIn = new WeakMap<object, string | undefined>()
createHook({
  init (_id, type, _trigger, resource) {
    if (type === 'Timeout') armedIn.set(resource, traceIdOf(context.active()))
  }
}).enable()

// Cancel requests are raw sockets, not pg spans: note the trace active where each was opened,
// and the backend it names (the CancelRequest packet: length 16, code 80877102, pid, key).
const cancels: Array<{ trace: string | undefined, pid: number }> = []
const socketsOpened = diagnostics.channel('net.client.socket')
socketsOpened.subscribe((message) => {
  const socket = (message as { socket: Socket }).socket
  const openedIn = traceIdOf(context.active())
  // Wrapped once connected: connect() replaces the socket's own write(), a wrapper put on now too.
  socket.prependOnceListener('connect', () => {
    const write = socket.write
    socket.write = function (this: Socket, chunk: unknown, ...rest: unknown[]) {
      if (Buffer.isBuffer(chunk) && chunk.length === 16 && chunk.readInt32BE(4) === 80877102) {
        cancels.push({ trace: openedIn, pid: chunk.readInt32BE(8) })
      }
      return (write as (...a: unknown[]) => boolean).call(this, chunk, ...rest)
    } as never
  })
})

const nanos = (span: ReadableSpan): bigint => BigInt(span.startTime[0]) * 1_000_000_000n + BigInt(span.startTime[1])
const pgQuerySpans = (): ReadableSpan[] => exporter.getFinishedSpans()
  .filter((s) => s.instrumentationScope.name === '@opentelemetry/instrumentation-pg' && s.name.startsWith('pg.query'))
const textOf = (span: ReadableSpan): string => String(span.attributes['db.query.text'] ?? '')
const PLUGIN_STATEMENT = /^(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE SAVEPOINT)\b/
const TAG = /\/\* (req-[\w-]+) \*\//

interface LogLine { msg: string, reqId?: string, trace_id?: string, level: number, because?: string }

/**
 * An app traced by @fastify/otel with this plugin, logging at debug into `lines`, each line with the
 * trace active when it was written (what @opentelemetry/instrumentation-pino adds). `traceOf` and
 * `routeOf`: each request's trace and route, by request id.
 */
async function tracedApp (db: Awaited<ReturnType<typeof createDatabase>>, options: Record<string, unknown>, fastifyOptions: Record<string, unknown> = {}) {
  const lines: LogLine[] = []
  const app = Fastify({
    ...fastifyOptions,
    logger: {
      level: 'debug',
      stream: { write (line: string) { lines.push(JSON.parse(line)) } },
      mixin () {
        const traceId = traceIdOf(context.active())
        return traceId === undefined ? {} : { trace_id: traceId }
      }
    }
  })
  db.closeFirst.push(() => app.close())
  await app.register(fastifyOtel.plugin())
  await app.register(requestDb, { env: { DATABASE_URL: db.url }, ...options })
  const traceOf = new Map<string, string>()
  const routeOf = new Map<string, string>()
  app.addHook('onRequest', (request, _reply, done) => {
    const otel = (request as unknown as { opentelemetry (): { span?: { spanContext (): { traceId: string } } } }).opentelemetry()
    traceOf.set(request.id, otel.span?.spanContext().traceId as string)
    routeOf.set(request.id, request.routeOptions.url as string)
    done()
  })
  return { app, lines, traceOf, routeOf }
}

t.test('50 concurrent requests: every span and log line the plugin causes sits in the trace of the request it serves', async (t) => {
  const db = await createDatabase(t)
  await db.admin.query('CREATE TABLE marks (id text)')
  const { app, lines, traceOf, routeOf } = await tracedApp(db, { max: 10, acquireTimeoutMs: 3000, abortGraceMs: 50, idleTimeoutMs: 2000 })

  type Req = { id: string, db: { query (text: string): Promise<unknown> } }
  // Every statement a handler sends names its request, so its span can be traced back.
  const q = (request: Req, sql: string, session = request.db): Promise<unknown> => session.query(`${sql} /* ${request.id} */`)
  const tx = { config: { db: { transaction: true } } }
  const holding = new Set<string>()
  let hangUpsHandled!: () => void
  const afterHangUps = new Promise<void>((resolve) => { hangUpsHandled = resolve })
  let hungUpHandlersDone = 0

  app.get('/ok', async (request) => {
    await q(request, 'SELECT pg_sleep(0.02)')
    return 'ok'
  })
  app.get('/tx', tx, async (request) => {
    await q(request, 'INSERT INTO marks VALUES (\'tx\')')
    await request.db.transaction(async (inner) => q(request, 'INSERT INTO marks VALUES (\'savepoint\')', inner))
    await request.db.transaction(async (inner) => q(request, 'SELECT 1/0', inner)).catch(() => {})
    return 'ok'
  })
  app.get('/tx-fail', tx, async (request) => {
    await q(request, 'INSERT INTO marks VALUES (\'rolled back\')')
    throw new Error('the handler failed')
  })
  app.get('/sql-fail', async (request) => {
    await request.db.transaction(async (inner) => {
      await q(request, 'SELECT 1', inner)
      await q(request, 'SELECT 1/0', inner)
    })
    return 'never'
  })
  app.get('/tx-stream', tx, async (request, reply) => {
    await q(request, 'INSERT INTO marks VALUES (\'streamed\')')
    const rows = request.db.query(new QueryStream(`SELECT i FROM generate_series(1, 2000) AS i /* ${request.id} */`, [], { batchSize: 100 }))
    return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
  })
  // Hangs up between statements of its route transaction: the sweep finds it and rolls back.
  app.get('/hang-tx', tx, async (request) => {
    try {
      await q(request, 'INSERT INTO marks VALUES (\'left open\')')
      holding.add(request.id)
      await afterHangUps
      await q(request, 'SELECT 2')
      return 'never'
    } finally {
      hungUpHandlersDone++
    }
  })
  // Hangs up while its statement runs (in a route transaction or not): cancelled after the grace.
  for (const [path, options] of [['/hang-query', {}], ['/hang-query-tx', tx]] as const) {
    app.get(path, options, async (request) => {
      try {
        await q(request, 'SELECT 1')
        holding.add(request.id)
        await q(request, 'SELECT pg_sleep(30)')
        return 'never'
      } finally {
        hungUpHandlersDone++
      }
    })
  }
  const port = await listen(app)
  const { gate } = app.db as unknown as { gate: { pool: { _idle: Array<{ client: object, timeoutId?: object }> }, held: { sweepTimer: object | null }, queue: { timer: object | null } } }

  // 1. Ten requests (a fifth) take every client of the pool, and will hang up.
  const hangUpPaths = [...Array(5).fill('/hang-tx'), ...Array(3).fill('/hang-query'), ...Array(2).fill('/hang-query-tx')]
  const sockets = hangUpPaths.map((path) => getOnOwnSocket(port, path))
  await waitFor(() => holding.size === 10, 10_000, 'the ten to hold their clients')
  await waitFor(async () => (await appBackends(db)).filter((b) => b.state === 'active' && b.query.includes('pg_sleep(30)')).length === 5, 5000, 'the five statements to run')

  // 2. Three wait for a client in vain (acquireTimeoutMs). The other 37 arrive later, so that their
  // deadlines fall well after the hang-ups have freed the pool.
  const victims = [0, 1, 2].map(() => get(port, '/ok'))
  await waitFor(() => app.db.stats().waiting === 3, 5000, 'three waiting')
  await sleep(1500)
  const restPaths = [...Array(15).fill('/ok'), ...Array(13).fill('/tx'), ...Array(3).fill('/tx-fail'), ...Array(3).fill('/sql-fail'), ...Array(3).fill('/tx-stream')]
  const rest = restPaths.map((path) => get(port, path).then((answer) => ({ path, ...answer })))
  await waitFor(() => app.db.stats().waiting >= 40, 5000, 'all 40 waiting')
  t.equal(restPaths.length + victims.length + sockets.length, 50, '50 requests in flight at once')
  // The pool-wide timers were armed while requests ran, yet carry none of their contexts.
  t.equal(armedIn.get(gate.held.sweepTimer as object), undefined, 'the sweep timer runs in no request\'s trace')
  t.equal(armedIn.get(gate.queue.timer as object), undefined, 'the wait queue\'s timer runs in no request\'s trace')

  t.same((await Promise.all(victims)).map((a) => a.status), [503, 503, 503], 'three timed out waiting for a client')
  // 3. The ten hang up; the sweep notices, and the 37 are served with the clients it frees.
  for (const socket of sockets) socket.destroy()
  const answers = await Promise.all(rest)
  const expected: Record<string, number> = { '/ok': 200, '/tx': 200, '/tx-fail': 500, '/sql-fail': 500, '/tx-stream': 200 }
  t.same(answers.filter((a) => a.status !== expected[a.path]).map((a) => `${a.path} ${a.status} ${a.body}`), [], 'each of the 37 answered as its route does')
  t.ok(answers.filter((a) => a.path === '/tx-stream').every((a) => a.body.trimEnd().split('\n').length === 2000), 'the streams were read to their end')
  await waitFor(() => app.db.stats().leased === 0, 5000, 'every client back')
  hangUpsHandled()
  await waitFor(() => hungUpHandlersDone === 10, 5000, 'the hung-up handlers to end')

  // pg-pool's idle timers: each was armed where its client was given back, by the request that
  // last used it (or by no request), never in another request's context.
  const spansBeforeIdle = pgQuerySpans()
  const lastUser = new Map<number, string>()
  for (const span of [...spansBeforeIdle].sort((a, b) => Number(nanos(a) - nanos(b)))) {
    const tag = TAG.exec(textOf(span))
    if (tag !== null) lastUser.set(span.attributes['test.client'] as number, tag[1])
  }
  const idle = gate.pool._idle
  t.ok(idle.length > 0, `${idle.length} idle clients`)
  for (const { client, timeoutId } of idle) {
    const armed = armedIn.get(timeoutId as object)
    const user = lastUser.get(clientIds.get(client) as number)
    t.ok(armed === undefined || armed === traceOf.get(user as string), `idle timer of the client ${user} used last: armed in ${armed ?? 'no trace'}`)
  }
  const pluginLinesBeforeIdle = lines.filter((l) => l.msg.startsWith('fastify-request-db')).length
  await waitFor(() => app.db.stats().total === 0, 5000, 'the idle clients to be closed')
  t.equal(pgQuerySpans().length, spansBeforeIdle.length, 'closing idle clients recorded no statement')
  t.equal(lines.filter((l) => l.msg.startsWith('fastify-request-db')).length, pluginLinesBeforeIdle, 'nor any log line')

  // The spans. Statements on one connection run one after another, each request's as a block: a
  // plugin statement serves the request whose statement precedes it on that connection (BEGIN: the
  // one that follows it).
  const spans = pgQuerySpans()
  const byClient = new Map<number, ReadableSpan[]>()
  for (const span of spans) {
    const id = span.attributes['test.client'] as number
    if (!byClient.has(id)) byClient.set(id, [])
    ;(byClient.get(id) as ReadableSpan[]).push(span)
  }
  const requestTraces = new Set(traceOf.values())
  t.equal(requestTraces.size, 50, '50 requests, 50 traces')
  const servedBy = new Map<ReadableSpan, string | undefined>()
  for (const list of byClient.values()) {
    list.sort((a, b) => Number(nanos(a) - nanos(b)))
    list.forEach((span, i) => {
      const text = textOf(span)
      const tag = TAG.exec(text)
      if (tag !== null) {
        servedBy.set(span, tag[1])
      } else if (PLUGIN_STATEMENT.test(text)) {
        const step = text.startsWith('BEGIN') ? 1 : -1
        let j = i + step
        while (j >= 0 && j < list.length && TAG.exec(textOf(list[j])) === null) j += step
        servedBy.set(span, j >= 0 && j < list.length ? (TAG.exec(textOf(list[j])) as RegExpExecArray)[1] : undefined)
      }
    })
  }
  const checked: Record<string, number> = {}
  const misplaced: string[] = []
  let userStatements = 0
  for (const [span, reqId] of servedBy) {
    const text = textOf(span)
    const plugin = TAG.exec(text) === null
    if (!plugin) userStatements++
    const kind = plugin ? `${routeOf.get(reqId as string)} ${text.replace(/ request_db_\d+/g, '')}` : 'user'
    if (plugin) checked[kind] = (checked[kind] ?? 0) + 1
    if (reqId === undefined || span.spanContext().traceId !== traceOf.get(reqId)) {
      const where = [...traceOf].find(([, traceId]) => traceId === span.spanContext().traceId)?.[0] ?? 'no request'
      misplaced.push(`${text} for ${reqId} (${routeOf.get(reqId as string)}) recorded in the trace of ${where} (${routeOf.get(where)})`)
    }
  }
  const pluginSpans = [...servedBy].filter(([span]) => TAG.exec(textOf(span)) === null).length
  t.same(misplaced, [], `${pluginSpans} plugin statements and ${userStatements} user statements checked; misplaced: ${misplaced.length}`)
  // Each route's statements, so that none of the cases went missing from the run.
  t.same(checked, {
    '/tx BEGIN': 13,
    '/tx SAVEPOINT': 26,
    '/tx RELEASE SAVEPOINT': 26,
    '/tx ROLLBACK TO SAVEPOINT': 13,
    '/tx COMMIT': 13,
    '/tx-fail BEGIN': 3,
    '/tx-fail ROLLBACK': 3,
    '/sql-fail BEGIN': 3,
    '/sql-fail ROLLBACK': 3,
    '/tx-stream BEGIN': 3,
    '/tx-stream COMMIT': 3,
    '/hang-tx BEGIN': 5,
    // The reset of the transaction the hang-up left open, sent from the sweep (the issue's case).
    '/hang-tx ROLLBACK': 5,
    '/hang-query-tx BEGIN': 2
  }, 'the plugin statements of every route, counted')
  const startup = spans.filter((s) => textOf(s) === 'SELECT 1')
  t.equal(startup.length, 1, 'one startup check')
  t.notOk(requestTraces.has(startup[0].spanContext().traceId), 'the startup check (checkConnection) is in no request\'s trace')
  t.equal(startup[0].parentSpanContext, undefined, 'and is a root of its own')

  // The cancel requests: each opened in the trace of the request whose statement it stops.
  const sleeping = new Map<number, string>()
  for (const [span, reqId] of servedBy) if (textOf(span).includes('pg_sleep(30)')) sleeping.set(span.attributes['test.pid'] as number, reqId as string)
  t.equal(cancels.length, 5, 'five cancel requests')
  for (const cancel of cancels) {
    const reqId = sleeping.get(cancel.pid)
    t.equal(cancel.trace, traceOf.get(reqId as string), `the cancel of ${reqId}'s statement was sent in its trace`)
  }

  // The log lines: each names its request (reqId) and was written in that request's trace.
  const pluginLines = lines.filter((l) => l.msg.startsWith('fastify-request-db'))
  t.equal(pluginLines.filter((l) => l.msg.includes('cancelling')).length, 5, 'a line per cancel')
  for (const line of pluginLines) {
    t.ok(line.reqId !== undefined && line.trace_id === traceOf.get(line.reqId), `"${line.msg}" (${line.because ?? ''}) for ${line.reqId}: written in its trace`)
  }
  t.comment(`spans checked: ${pluginSpans} of the plugin + ${userStatements} user statements, ${cancels.length} cancel requests, ${pluginLines.length} log lines; misplaced: ${misplaced.length}`)
})

t.test('the other ways work for a request starts outside it: a held connection fails, handlerTimeout, a reply nobody reads, shutdown', async (t) => {
  const db = await createDatabase(t)
  // One connection, opened by the first request: its socket's events come in that request's context.
  const { app, lines, traceOf, routeOf } = await tracedApp(db, { max: 1, abortGraceMs: 50, shutdownTimeoutMs: 300 })
  let backendPid = 0
  let dropped!: () => void
  const afterDrop = new Promise<void>((resolve) => { dropped = resolve })
  app.get('/first', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  app.get('/dropped', async (request) => {
    backendPid = (await request.db.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
    await afterDrop
    return (await request.db.query('SELECT 1 AS one')).rows[0]
  })
  app.get('/too-slow', { handlerTimeout: 500 }, async (request) => request.db.query('SELECT pg_sleep(30)'))
  app.get('/unread', async (request, reply) => reply.send(request.db.query(copyTo(
    'COPY (SELECT repeat(\'x\', 1000) FROM generate_series(1, 1000000)) TO STDOUT'))))
  app.get('/at-shutdown', async (request) => request.db.query('SELECT pg_sleep(30)'))
  const port = await listen(app)

  t.equal((await get(port, '/first')).status, 200)
  // The connection dies while a request holds it (its 'error' comes from the socket)...
  const droppedAnswer = get(port, '/dropped')
  await waitFor(() => backendPid !== 0, 5000, 'the request to hold the connection')
  await db.admin.query('SELECT pg_terminate_backend($1)', [backendPid])
  await waitFor(() => lines.some((l) => l.msg.includes('connection failed')), 5000, 'the failure to be noticed')
  dropped()
  t.equal((await droppedAnswer).status, 200, 'and the next statement took a new one')
  // ...handlerTimeout cancels a statement (its signal, from Fastify's timer)...
  t.equal((await get(port, '/too-slow')).status, 503)
  // ...a reply nobody reads to its end is stopped (the response's 'close', then a grace timer)...
  await readThenHangUp(port, '/unread', 100_000)
  await waitFor(() => lines.some((l) => l.because === 'a stream nobody reads'), 5000, 'the stream to be stopped')
  await waitFor(() => app.db.stats().leased === 0, 5000, 'release')
  // ...and shutdown's deadline cancels what still runs.
  const atShutdown = get(port, '/at-shutdown')
  await waitFor(() => app.db.stats().leased === 1, 5000, 'the last request to hold the connection')
  await app.close()
  t.equal((await atShutdown).status, 503)

  const expected = [
    ['/dropped', 'connection failed'],
    ['/too-slow', 'handlerTimeout'],
    ['/unread', 'a stream nobody reads'],
    ['/at-shutdown', 'the server is shutting down']
  ]
  const pluginLines = lines.filter((l) => l.msg.startsWith('fastify-request-db'))
  for (const [route, what] of expected) {
    const line = pluginLines.find((l) => routeOf.get(l.reqId as string) === route && (l.msg.includes(what) || l.because === what))
    t.ok(line !== undefined, `${route}: a line about "${what}"`)
  }
  const requestTraces = new Set(traceOf.values())
  for (const line of pluginLines) {
    if (line.reqId === undefined) {
      // The app's own (shutdown's deadline): in no request's trace.
      t.notOk(requestTraces.has(line.trace_id as string), `"${line.msg}": about the app, in no request's trace`)
    } else {
      t.equal(line.trace_id, traceOf.get(line.reqId), `"${line.msg}" (${line.because ?? ''}) for ${line.reqId} (${routeOf.get(line.reqId)}): written in its trace`)
    }
  }
  t.same(app.db.stats(), { total: 0, idle: 0, waiting: 0, leased: 0, leaksDetected: 0 })
})

/** Collects on demand, for the test to read the instruments' current values. */
class Reader extends MetricReader {
  protected async onShutdown (): Promise<void> {}
  protected async onForceFlush (): Promise<void> {}
}

async function connectionCounts (reader: Reader): Promise<Record<string, number>> {
  const { resourceMetrics } = await reader.collect()
  const metrics: MetricData[] = resourceMetrics.scopeMetrics.flatMap((s) => s.metrics)
  const counts: Record<string, number> = {}
  for (const metric of metrics) {
    if (metric.descriptor.name !== 'db.client.connection.count') continue
    for (const point of metric.dataPoints) {
      counts[`${String(point.attributes['db.client.connection.pool.name'])} ${String(point.attributes['db.client.connection.state'])}`] = point.value as number
    }
  }
  return counts
}

t.test('pool metrics carry the configured host, port and database, not libpq\'s defaults', async (t) => {
  const db = await createDatabase(t)
  const reader = new Reader()
  pgInstrumentation.setMeterProvider(new MeterProvider({ readers: [reader] }))
  const app = Fastify()
  db.closeFirst.push(() => app.close())
  // DATABASE_URL and nothing else: the app of the issue.
  await app.register(requestDb, { env: { DATABASE_URL: db.url } })
  app.get('/one', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  await Promise.all(Array.from({ length: 5 }, () => app.inject('/one')))
  const url = new URL(db.url)
  const name = `${url.hostname}:${url.port}/${db.name}`
  const counts = await connectionCounts(reader)
  t.ok(Object.keys(counts).length > 0 && Object.keys(counts).every((key) => key.startsWith(`${name} `)), `named ${name}: ${JSON.stringify(counts)}`)
  const stats = app.db.stats()
  t.equal(stats.leased, 0, 'nothing held once the requests are over')
  t.equal(counts[`${name} used`] + counts[`${name} idle`], stats.total, 'used + idle = the pool\'s clients')
  // pg-pool emits 'release' before it puts the client back on its idle list, and instrumentation-pg
  // counts in that listener: the client given back last stays "used" until the pool's next event.
  t.ok(counts[`${name} used`] <= 1, `at most that one client counted as used (${counts[`${name} used`]}; next test)`)
})

// Documents instrumentation-pg 0.76 with pg-pool 3: if this fails, the lag is gone upstream.
t.test('the same lag with a bare pg.Pool and no plugin: it is instrumentation-pg\'s', async (t) => {
  const db = await createDatabase(t)
  const reader = new Reader()
  pgInstrumentation.setMeterProvider(new MeterProvider({ readers: [reader] }))
  const pool = new pg.Pool({ connectionString: db.url, max: 2 })
  // The database's teardown terminates its backends: an idle client's error must not go unheard.
  pool.on('error', () => {})
  // Ended in the test's body, before the database's teardown; here only if an assertion threw first.
  t.teardown(() => pool.ending ? undefined : pool.end())
  const client = await pool.connect()
  await client.query('SELECT 1')
  client.release()
  const counts = await connectionCounts(reader)
  t.same({ total: pool.totalCount, idle: pool.idleCount }, { total: 1, idle: 1 }, 'the pool says: one client, idle')
  // The name, too: it never reads connectionString.
  t.same(counts, { 'unknown_host:unknown_port/unknown_database used': 1, 'unknown_host:unknown_port/unknown_database idle': 0 },
    'instrumentation-pg says: one used, none idle, in a pool it cannot name')
  await pool.end()
})
