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
  // Only the events the observer handles: an event with no subscriber costs its publish nothing,
  // and every statement of every request passes here.
  const mine = (events: Record<string, ((message: any) => void) | undefined>): Record<string, (message: unknown) => void> => {
    const handlers: Record<string, (message: unknown) => void> = {}
    for (const [event, handler] of Object.entries(events)) {
      if (handler === undefined) continue
      handlers[event] = (message) => {
        if ((message as { pool: PostgresPool }).pool === pool) handler.call(observer, message)
      }
    }
    return handlers
  }
  const acquire = mine({ start: observer.acquiring, asyncEnd: observer.acquired })
  const query = mine({ asyncEnd: observer.queried })
  const { release, cancel } = mine({ release: observer.released, cancel: observer.cancelled })
  acquireChannel.subscribe(acquire as never)
  queryChannel.subscribe(query as never)
  if (release !== undefined) subscribe(CHANNEL_NAMES.release, release)
  if (cancel !== undefined) subscribe(CHANNEL_NAMES.cancel, cancel)
  return () => {
    acquireChannel.unsubscribe(acquire as never)
    queryChannel.unsubscribe(query as never)
    if (release !== undefined) unsubscribe(CHANNEL_NAMES.release, release)
    if (cancel !== undefined) unsubscribe(CHANNEL_NAMES.cancel, cancel)
  }
}
