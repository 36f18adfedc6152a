import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { Counter, Gauge, register as defaultRegistry, type Registry } from 'prom-client'
import { subscribeToPool } from '../observability/subscribe.js'
import { operationOf } from './operation.js'
import { type Series, SeriesHistogram } from './prometheus-histogram.js'

/** Options for `app.register(requestDbPrometheus, options)`. */
export interface RequestDbPrometheusOptions {
  /** Where the metrics are registered. Default: prom-client's global registry. */
  registry?: Registry
  /** Histogram buckets in seconds. Default: from 1 ms to 10 s. */
  buckets?: number[]
}

const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

/**
 * The pool's metrics in a prom-client registry, named after OpenTelemetry's semantic conventions
 * for database clients in Prometheus form (`db_client_connection_count`, …, seconds and `_total`),
 * plus the plugin's own where no convention exists (`fastify_request_db_*`). Register it after
 * fastify-request-db; scrape the registry from a `/metrics` route or with fastify-metrics.
 * Fed by the plugin's diagnostics channels: nothing is measured on a request's path unless this
 * is registered.
 */
async function prometheusMetrics (app: FastifyInstance, options: RequestDbPrometheusOptions): Promise<void> {
  const registry = options.registry ?? defaultRegistry
  const buckets = options.buckets ?? BUCKETS
  const pool = app.db.pool
  const poolName = app.db.name
  const labels = { pool_name: poolName }
  const registers = [registry]
  const metrics: unknown[] = [
    new Gauge({
      name: 'db_client_connection_count',
      help: 'Connections of the pool, by state (idle, used)',
      labelNames: ['pool_name', 'state'],
      registers,
      collect () {
        const { total, idle } = app.db.stats()
        this.set({ ...labels, state: 'idle' }, idle)
        this.set({ ...labels, state: 'used' }, total - idle)
      }
    }),
    new Gauge({
      name: 'db_client_connection_max',
      help: 'Most connections the pool opens',
      labelNames: ['pool_name'],
      registers,
      collect () {
        this.set(labels, pool.options?.max ?? Number.NaN)
      }
    }),
    new Gauge({
      name: 'db_client_connection_pending_requests',
      help: 'Checkouts waiting for a connection',
      labelNames: ['pool_name'],
      registers,
      collect () {
        this.set(labels, app.db.stats().waiting)
      }
    })
  ]
  const waitTime = new SeriesHistogram({ name: 'db_client_connection_wait_time_seconds', help: 'Time to obtain a connection from the pool', labelNames: ['pool_name'], buckets, registers })
  const useTime = new SeriesHistogram({ name: 'db_client_connection_use_time_seconds', help: 'Time between taking a connection and giving it back', labelNames: ['pool_name'], buckets, registers })
  const timeouts = new Counter({ name: 'db_client_connection_timeouts_total', help: 'Checkouts that timed out waiting for a connection', labelNames: ['pool_name'], registers })
  const duration = new SeriesHistogram({ name: 'db_client_operation_duration_seconds', help: 'Duration of database statements (a stream: its whole run)', labelNames: ['pool_name', 'db_operation_name', 'error_type'], buckets, registers })
  const destroyed = new Counter({ name: 'fastify_request_db_connections_destroyed_total', help: 'Connections closed instead of reused, by reason', labelNames: ['pool_name', 'reason'], registers })
  const cancels = new Counter({ name: 'fastify_request_db_cancels_total', help: 'CancelRequests sent for statements of requests that went away, timed out or outlived shutdown', labelNames: ['pool_name'], registers })
  const rejected = new Counter({ name: 'fastify_request_db_checkouts_rejected_total', help: 'Checkouts answered with an error (503), by its code', labelNames: ['pool_name', 'code'], registers })
  const leaks = new Counter({
    name: 'fastify_request_db_leaks_detected_total',
    help: 'Leases held longer than leakDetectionMs',
    labelNames: ['pool_name'],
    registers,
    collect () {
      // The leak detector counts them (app.db.stats()); a counter read at scrape time.
      this.reset()
      this.inc(labels, app.db.stats().leaksDetected)
    }
  })
  metrics.push(waitTime, useTime, timeouts, duration, destroyed, cancels, rejected, leaks)
  const waits = waitTime.seriesFor('', labels)
  const uses = useTime.seriesFor('', labels)
  // A statement's series by operation (SELECT, INSERT, …): found by its command tag alone when it
  // succeeded, the common case; a failure's key adds its error type.
  const succeeded = new Map<string, Series>()
  const durationSeries = (operation: string, errorType: string): Series => {
    if (errorType !== '') return duration.seriesFor(`${operation} ${errorType}`, { ...labels, db_operation_name: operation, error_type: errorType })
    let series = succeeded.get(operation)
    if (series === undefined) {
      series = duration.seriesFor(`${operation} `, { ...labels, db_operation_name: operation, error_type: '' })
      succeeded.set(operation, series)
    }
    return series
  }

  const unsubscribe = subscribeToPool(pool, {
    acquired (message) {
      if (message.error === undefined) {
        waitTime.record(waits, (message.waitMs ?? 0) / 1000)
        return
      }
      const code = (message.error as { code?: string }).code ?? message.error.name
      rejected.inc({ ...labels, code })
      if (code === 'FST_REQUEST_DB_ACQUIRE_TIMEOUT') timeouts.inc(labels)
    },
    queried (message) {
      const errorType = message.error === undefined ? '' : (message.error as { code?: string }).code ?? message.error.name
      duration.record(durationSeries(message.command ?? operationOf(message.text), errorType), (message.durationMs ?? 0) / 1000)
    },
    released (message) {
      useTime.record(uses, message.heldMs / 1000)
      if (message.destroyed) destroyed.inc({ ...labels, reason: message.reason ?? 'unknown' })
    },
    cancelled () {
      cancels.inc(labels)
    }
  })
  app.addHook('onClose', async () => {
    unsubscribe()
    for (const metric of metrics) registry.removeSingleMetric((metric as unknown as { name: string }).name)
  })
}

export const requestDbPrometheus = fp<RequestDbPrometheusOptions>(prometheusMetrics, {
  fastify: '5.x',
  name: 'fastify-request-db-prometheus',
  dependencies: ['fastify-request-db']
})

export default requestDbPrometheus
