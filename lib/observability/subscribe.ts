import { subscribe, unsubscribe } from 'node:diagnostics_channel'
import type { PostgresPool } from '../postgres-pool.js'
import {
  type AcquireMessage,
  acquireChannel,
  CHANNEL_NAMES,
  type CancelMessage,
  queryChannel,
  type QueryMessage,
  type ReleaseMessage
} from './channels.js'

/** What an integration does with the messages of one pool. Each handler is optional. */
export interface PoolObserver {
  /** A checkout began, in the caller's async context (a span started here is the request's). */
  acquiring? (message: AcquireMessage): void
  /** A checkout was answered: `waitMs`, and `error` if it failed. */
  acquired? (message: AcquireMessage): void
  /** A statement or stream ended: `durationMs`, `command`, `error`. */
  queried? (message: QueryMessage): void
  released? (message: ReleaseMessage): void
  cancelled? (message: CancelMessage): void
}

/**
 * Subscribe `observer` to the plugin's channels for `pool`'s messages only (several apps share the
 * channels in one process). Returns the unsubscribe function.
 */
export function subscribeToPool (pool: PostgresPool, observer: PoolObserver): () => void {
  const mine = <M extends { pool: PostgresPool }>(handler: ((message: M) => void) | undefined) =>
    (message: unknown): void => {
      if (handler !== undefined && (message as M).pool === pool) handler.call(observer, message as M)
    }
  const acquire = { start: mine(observer.acquiring), end () {}, asyncStart () {}, asyncEnd: mine(observer.acquired), error () {} }
  const query = { start () {}, end () {}, asyncStart () {}, asyncEnd: mine(observer.queried), error () {} }
  const release = mine(observer.released)
  const cancel = mine(observer.cancelled)
  acquireChannel.subscribe(acquire as never)
  queryChannel.subscribe(query as never)
  subscribe(CHANNEL_NAMES.release, release)
  subscribe(CHANNEL_NAMES.cancel, cancel)
  return () => {
    acquireChannel.unsubscribe(acquire as never)
    queryChannel.unsubscribe(query as never)
    unsubscribe(CHANNEL_NAMES.release, release)
    unsubscribe(CHANNEL_NAMES.cancel, cancel)
  }
}
