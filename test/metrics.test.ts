// The metrics integrations with the real libraries: a prom-client registry scraped from a real
// /metrics route, and OpenTelemetry's SDK with an in-memory reader and span exporter.
import { context, trace } from '@opentelemetry/api'
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks'
import { AggregationTemporality, InMemoryMetricExporter, MeterProvider, PeriodicExportingMetricReader } from '@opentelemetry/sdk-metrics'
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { Registry } from 'prom-client'
import t from 'tap'
import requestDbOpenTelemetry from '../lib/integrations/opentelemetry.js'
import requestDbPrometheus from '../lib/integrations/prometheus.js'
import { buildApp, createDatabase, waitFor } from './helpers/db.js'
import { get, getOnOwnSocket, listen } from './helpers/http.js'

/** The value of one Prometheus sample line, e.g. `db_client_connection_count{pool_name="…",state="idle"}`. */
function sample (text: string, name: string, labels: Record<string, string> = {}): number {
  const lines = text.split('\n').filter((line) => line.startsWith(name + '{') || line.startsWith(name + ' '))
  const match = lines.find((line) => Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`)))
  return match === undefined ? Number.NaN : Number(match.slice(match.lastIndexOf(' ') + 1))
}

t.test('prom-client: a real /metrics scrape shows the pool, waits, statements, destroyed connections, cancels and 503s', async (t) => {
  const db = await createDatabase(t)
  const registry = new Registry()
  const app = await buildApp(db, { max: 2, acquireTimeoutMs: 200, abortGraceMs: 0, leakDetectionMs: 100 })
  await app.register(requestDbPrometheus, { registry })
  app.get('/metrics', async (_request, reply) => reply.type(registry.contentType).send(await registry.metrics()))
  app.get('/q', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  app.get('/set', async (request) => request.db.query("SET application_name = 'changed'"))
  app.get('/slow', async (request) => request.db.query('SELECT pg_sleep(30)'))
  const port = await listen(app)

  for (let i = 0; i < 5; i++) t.equal((await get(port, '/q')).status, 200)
  await get(port, '/set')
  const sockets = [getOnOwnSocket(port, '/slow'), getOnOwnSocket(port, '/slow')]
  await waitFor(() => app.db.stats().leased === 2, 3000, 'both clients held')
  t.equal((await get(port, '/q')).status, 503, 'the pool is full: a timeout')
  const busy = (await get(port, '/metrics')).body
  for (const s of sockets) s.destroy()
  await waitFor(() => app.db.stats().leased === 0, 3000, 'release after the hang-ups')
  const scrape = (await get(port, '/metrics')).body
  t.comment(scrape.split('\n').filter((l) => l.startsWith('db_client_connection_count') || l.startsWith('fastify_request_db') || l.startsWith('db_client_connection_timeouts')).join('\n'))

  const pool = { pool_name: app.db.name }
  t.match(app.db.name, /^127\.0\.0\.1:\d+\/rdb_/, 'the pool is named host:port/database')
  t.equal(sample(busy, 'db_client_connection_count', { ...pool, state: 'used' }), 2, 'two used while the slow requests held them')
  t.equal(sample(busy, 'db_client_connection_max', pool), 2)
  t.ok(sample(scrape, 'db_client_connection_wait_time_seconds_count', pool) >= 8, 'every checkout\'s wait observed')
  t.ok(sample(scrape, 'db_client_connection_use_time_seconds_count', pool) >= 8, 'every release\'s hold time observed')
  t.ok(sample(scrape, 'db_client_operation_duration_seconds_count', { ...pool, db_operation_name: 'SELECT' }) >= 5, 'statements timed, by operation')
  t.equal(sample(scrape, 'db_client_connection_timeouts_total', pool), 1)
  t.equal(sample(scrape, 'fastify_request_db_checkouts_rejected_total', { ...pool, code: 'FST_REQUEST_DB_ACQUIRE_TIMEOUT' }), 1)
  t.equal(sample(scrape, 'fastify_request_db_connections_destroyed_total', { ...pool, reason: 'session-changed' }), 1)
  t.equal(sample(scrape, 'fastify_request_db_connections_destroyed_total', { ...pool, reason: 'cancelled' }), 2)
  t.equal(sample(scrape, 'fastify_request_db_cancels_total', pool), 2)
  t.equal(sample(scrape, 'db_client_connection_pending_requests', pool), 0)
  t.equal(sample(scrape, 'fastify_request_db_leaks_detected_total', pool), 2, 'the two slow requests held their clients past leakDetectionMs')
})

t.test('OpenTelemetry: semantic-convention metrics, and a wait span under the request\'s span', async (t) => {
  const db = await createDatabase(t)
  const exporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE)
  const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3_600_000 })
  const meterProvider = new MeterProvider({ readers: [reader] })
  const spans = new InMemorySpanExporter()
  const tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] })
  const contextManager = new AsyncLocalStorageContextManager().enable()
  context.setGlobalContextManager(contextManager)
  t.teardown(async () => {
    context.disable()
    await meterProvider.shutdown()
    await tracerProvider.shutdown()
  })
  const app = await buildApp(db, { max: 1, acquireTimeoutMs: 200 })
  await app.register(requestDbOpenTelemetry, { meterProvider, tracerProvider })
  app.get('/q', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  app.get('/slow', async (request) => request.db.query('SELECT pg_sleep(0.5)'))
  await app.ready()

  const tracer = tracerProvider.getTracer('test')
  const parent = tracer.startSpan('GET /q')
  // inject's answer is lazy: it starts when awaited, so await it inside the span's context.
  await context.with(trace.setSpan(context.active(), parent), async () => await app.inject('/q'))
  parent.end()
  const slow = app.inject('/slow')
  await waitFor(() => app.db.stats().leased === 1, 3000, 'the slow request to hold the only client')
  t.equal((await app.inject('/q')).statusCode, 503)
  await slow

  // What an exporter would ship: flushed through the reader into the in-memory exporter.
  await reader.forceFlush()
  const exported = exporter.getMetrics()
  const resourceMetrics = exported[exported.length - 1]
  const all = new Map(resourceMetrics.scopeMetrics.flatMap((s) => s.metrics).map((m) => [m.descriptor.name, m]))
  for (const name of ['db.client.connection.count', 'db.client.connection.max', 'db.client.connection.pending_requests', 'db.client.connection.wait_time', 'db.client.connection.use_time', 'db.client.connection.timeouts', 'db.client.operation.duration']) {
    t.ok(all.has(name), `${name} published`)
  }
  const points = (name: string): Array<{ attributes: Record<string, unknown>, value: unknown }> => (all.get(name)?.dataPoints ?? []) as never
  t.ok(points('db.client.connection.count').some((p) => p.attributes['db.client.connection.state'] === 'idle'), 'count by state')
  t.ok(points('db.client.connection.count').every((p) => p.attributes['db.client.connection.pool.name'] === app.db.name), 'named after the pool')
  t.equal(points('db.client.connection.timeouts')[0]?.value, 1)
  t.equal(points('db.client.connection.max')[0]?.value, 1)
  const wait = points('db.client.connection.wait_time')[0]?.value as { count: number } | undefined
  t.equal(wait?.count, 2, 'the two checkouts that got a client')

  const finished = spans.getFinishedSpans()
  const waits = finished.filter((s) => s.name === 'db.client.connection.wait')
  t.equal(waits.length, 3, 'a wait span per checkout, the timed-out one too')
  const first = waits.find((s) => s.parentSpanContext?.spanId === parent.spanContext().spanId)
  t.ok(first, 'the wait sits under the request\'s span')
  t.equal(first?.spanContext().traceId, parent.spanContext().traceId)
  t.ok(waits.some((s) => s.status.code === 2 && s.attributes['error.type'] === 'FST_REQUEST_DB_ACQUIRE_TIMEOUT'), 'the timed-out wait is marked as an error')
})
