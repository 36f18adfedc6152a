import { type Attributes, type BatchObservableResult, context, type MeterProvider, metrics, type Span, SpanStatusCode, trace, type TracerProvider } from '@opentelemetry/api'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import type { AcquireMessage } from '../observability/channels.js'
import { subscribeToPool } from '../observability/subscribe.js'
import { operationOf } from './operation.js'

/** Options for `app.register(requestDbOpenTelemetry, options)`. */
export interface RequestDbOpenTelemetryOptions {
  /** Where the metrics go. Default: the global MeterProvider (`metrics.setGlobalMeterProvider`). */
  meterProvider?: MeterProvider
  /** Where the connection-wait spans go. Default: the global TracerProvider. */
  tracerProvider?: TracerProvider
  /** A span for each wait for a connection, under the request's span. Default: true. */
  waitSpans?: boolean
}

const SCOPE = 'fastify-request-db'

/**
 * The pool's metrics through `@opentelemetry/api`, in OpenTelemetry's semantic conventions for
 * database client connections (`db.client.connection.count` by state, `.max`, `.pending_requests`,
 * `.wait_time`, `.use_time`, `.timeouts`, and `db.client.operation.duration`), plus the plugin's
 * own under `fastify_request_db.*`; and a span for each wait for a connection, so a slow request's
 * trace shows whether it waited for the pool or for the database (statement spans come from
 * @opentelemetry/instrumentation-pg). Fed by the plugin's diagnostics channels.
 */
async function openTelemetry (app: FastifyInstance, options: RequestDbOpenTelemetryOptions): Promise<void> {
  const meter = (options.meterProvider ?? metrics.getMeterProvider()).getMeter(SCOPE)
  const tracer = (options.tracerProvider ?? trace.getTracerProvider()).getTracer(SCOPE)
  const pool = app.db.pool
  const base: Attributes = { 'db.client.connection.pool.name': app.db.name, 'db.system.name': 'postgresql' }

  const count = meter.createObservableUpDownCounter('db.client.connection.count', { unit: '{connection}', description: 'Connections of the pool, by state' })
  const max = meter.createObservableUpDownCounter('db.client.connection.max', { unit: '{connection}', description: 'Most connections the pool opens' })
  const pending = meter.createObservableUpDownCounter('db.client.connection.pending_requests', { unit: '{request}', description: 'Checkouts waiting for a connection' })
  const leaks = meter.createObservableCounter('fastify_request_db.leaks_detected', { unit: '{lease}', description: 'Leases held longer than leakDetectionMs' })
  const observables = [count, max, pending, leaks]
  const observe = (result: BatchObservableResult): void => {
    const { total, idle, waiting, leaksDetected } = app.db.stats()
    result.observe(leaks, leaksDetected, base)
    result.observe(count, idle, { ...base, 'db.client.connection.state': 'idle' })
    result.observe(count, total - idle, { ...base, 'db.client.connection.state': 'used' })
    result.observe(max, pool.options?.max ?? 0, base)
    result.observe(pending, waiting, base)
  }
  meter.addBatchObservableCallback(observe, observables)
  const waitTime = meter.createHistogram('db.client.connection.wait_time', { unit: 's', description: 'Time to obtain a connection from the pool' })
  const useTime = meter.createHistogram('db.client.connection.use_time', { unit: 's', description: 'Time between taking a connection and giving it back' })
  const timeouts = meter.createCounter('db.client.connection.timeouts', { unit: '{timeout}', description: 'Checkouts that timed out waiting for a connection' })
  const duration = meter.createHistogram('db.client.operation.duration', { unit: 's', description: 'Duration of database statements (a stream: its whole run)' })
  const destroyed = meter.createCounter('fastify_request_db.connection.destroyed', { unit: '{connection}', description: 'Connections closed instead of reused, by reason' })
  const cancels = meter.createCounter('fastify_request_db.cancels', { unit: '{cancel}', description: 'CancelRequests sent for requests that went away, timed out or outlived shutdown' })
  const rejected = meter.createCounter('fastify_request_db.checkouts.rejected', { unit: '{checkout}', description: 'Checkouts answered with an error (503), by its code' })

  const waitSpans = options.waitSpans !== false
  const spans = new WeakMap<AcquireMessage, Span>()
  const unsubscribe = subscribeToPool(pool, {
    acquiring (message) {
      // Published synchronously where the checkout starts: the active context is the request's.
      if (waitSpans) spans.set(message, tracer.startSpan('db.client.connection.wait', { attributes: base }, context.active()))
    },
    acquired (message) {
      const span = spans.get(message)
      if (message.error === undefined) {
        waitTime.record((message.waitMs ?? 0) / 1000, base)
        span?.end()
        return
      }
      const code = (message.error as { code?: string }).code ?? message.error.name
      rejected.add(1, { ...base, 'error.type': code })
      if (code === 'FST_REQUEST_DB_ACQUIRE_TIMEOUT') timeouts.add(1, base)
      if (span !== undefined) {
        span.setStatus({ code: SpanStatusCode.ERROR, message: code })
        span.setAttribute('error.type', code)
        span.end()
      }
    },
    queried (message) {
      const attributes: Attributes = { ...base, 'db.operation.name': message.command ?? operationOf(message.text) }
      if (message.error !== undefined) attributes['error.type'] = (message.error as { code?: string }).code ?? message.error.name
      duration.record((message.durationMs ?? 0) / 1000, attributes)
    },
    released (message) {
      useTime.record(message.heldMs / 1000, base)
      if (message.destroyed) destroyed.add(1, { ...base, reason: message.reason ?? 'unknown' })
    },
    cancelled () {
      cancels.add(1, base)
    }
  })
  app.addHook('onClose', async () => {
    unsubscribe()
    meter.removeBatchObservableCallback(observe, observables)
  })
}

export const requestDbOpenTelemetry = fp<RequestDbOpenTelemetryOptions>(openTelemetry, {
  fastify: '5.x',
  name: 'fastify-request-db-opentelemetry',
  dependencies: ['fastify-request-db']
})

export default requestDbOpenTelemetry
