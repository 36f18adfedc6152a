import { channel, tracingChannel } from 'node:diagnostics_channel'
import type { FastifyRequest } from 'fastify'
import type { PostgresPool } from '../postgres-pool.js'

/**
 * What the plugin does, published on Node's `diagnostics_channel`, the way undici and Fastify
 * publish theirs: any APM, metrics library or test can subscribe without patching anything, and
 * with no subscriber a publish point costs one `hasSubscribers` read. The plugin's own metrics
 * integrations (fastify-request-db/prometheus, fastify-request-db/opentelemetry) are subscribers.
 *
 * Every message names the `pool` it concerns (the app's `app.db.pool`: several apps in one process
 * share the channels) and the `request` it serves (null for `app.db` work). Names and payloads are
 * a public contract, documented in docs/observability.md.
 */

/** A checkout: `start` when it begins, `asyncEnd` once answered (`error` before it on failure). */
export interface AcquireMessage {
  pool: PostgresPool
  request: FastifyRequest | null
  /** Set when answered: how long it waited for a client, in milliseconds. */
  waitMs?: number
  /** Set on failure: the typed error the caller gets (FST_REQUEST_DB_ACQUIRE_TIMEOUT, …). */
  error?: Error
}

/** A statement, or a stream's whole run. `asyncEnd` when over; `error` before it on failure. */
export interface QueryMessage {
  pool: PostgresPool
  request: FastifyRequest | null
  /** The SQL text, never the values. */
  text: string
  /** A stream (pg-query-stream, pg-cursor, COPY): over when the server has sent its last row. */
  streaming: boolean
  /** When it started (performance.now()). */
  startTime: number
  /** Set when over: its duration in milliseconds. */
  durationMs?: number
  /** Set on success (not for streams): pg's command tag and row count. */
  command?: string
  rowCount?: number | null
  /** Set on failure. */
  error?: Error
}

/** Why a connection was closed instead of going back to the pool for reuse. */
export type DestroyReason =
  | 'failed' // the connection broke
  | 'cancelled' // it was sent a CancelRequest (a late one could hit its next statement)
  | 'session-changed' // SET, temp table, LISTEN, … (see session-state.ts)
  | 'raw-client' // request.db.client() was handed out: its statements could not be seen
  | 'still-running' // a statement was still in flight when it had to go back
  | 'rollback-failed'
  | 'shutdown'

/** A client given back: reused (`destroyed: false`) or closed, and why. */
export interface ReleaseMessage {
  pool: PostgresPool
  request: FastifyRequest | null
  destroyed: boolean
  reason: DestroyReason | null
  /** How long it was held, in milliseconds. */
  heldMs: number
}

/** A CancelRequest sent for a request's running statement (hang-up, handlerTimeout, shutdown). */
export interface CancelMessage {
  pool: PostgresPool
  request: FastifyRequest | null
}

export const CHANNEL_NAMES = {
  acquire: 'fastify-request-db:acquire',
  query: 'fastify-request-db:query',
  release: 'fastify-request-db:release',
  cancel: 'fastify-request-db:cancel'
} as const

export const acquireChannel = tracingChannel<AcquireMessage>(CHANNEL_NAMES.acquire)
export const queryChannel = tracingChannel<QueryMessage>(CHANNEL_NAMES.query)
export const releaseChannel = channel(CHANNEL_NAMES.release)
export const cancelChannel = channel(CHANNEL_NAMES.cancel)

/** Publish the end of a traced operation: `error` (on failure), then `asyncStart` and `asyncEnd`. */
export function publishEnd<M extends { error?: Error }> (traced: typeof acquireChannel | typeof queryChannel, message: M, err: Error | null | undefined): void {
  const channels = traced as unknown as { error: { publish (m: M): void }, asyncStart: { publish (m: M): void }, asyncEnd: { publish (m: M): void } }
  if (err !== null && err !== undefined) {
    message.error = err
    channels.error.publish(message)
  }
  channels.asyncStart.publish(message)
  channels.asyncEnd.publish(message)
}
