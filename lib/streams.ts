import type { PoolClient } from 'pg'
import { isConnectionError } from './pool.js'

/**
 * Streams on the request's client: anything pg accepts as a "submittable" (pg-query-stream,
 * pg-cursor, pg-copy-streams' copyTo/copyFrom). pg hands it the connection and calls its
 * handle*() methods with the server's messages; it is done when the server says ReadyForQuery
 * after it, or when the connection fails. Those two calls are all the plugin needs to count it as
 * a statement in flight, which is what lets the connection go back to the pool afterwards instead
 * of being closed, as it must be when user code ran it on the raw client unseen.
 */
export interface Submittable {
  submit (connection: unknown): void
  handleReadyForQuery (connection?: unknown): void
  handleError (err: Error, connection?: unknown): void
  /** pg-cursor, pg-copy-streams: the statement's text (for the session-state check). */
  text?: string
  /** pg-cursor: close the portal, which ends the statement on the server at once. */
  close?: (callback?: (err?: Error) => void) => unknown
  /** pg-query-stream: its pg-cursor. */
  cursor?: Submittable
}

export function isSubmittable (value: unknown): value is Submittable {
  return typeof (value as { submit?: unknown } | null)?.submit === 'function'
}

/** The statement's text, where the submittable says it. */
export function submittableText (sub: Submittable): string | undefined {
  return sub.text ?? sub.cursor?.text
}

/**
 * Call `done` once, when `sub` is over on the connection: `done(null)` after its ReadyForQuery or
 * its error, `done(err)` when the connection failed under it. Wraps the two methods on the instance; pg calls
 * them as methods of whatever it was given.
 */
export function whenSubmittableDone (sub: Submittable, done: (connectionError: Error | null) => void): void {
  const ready = sub.handleReadyForQuery
  const failed = sub.handleError
  let over = false
  sub.handleReadyForQuery = function (this: Submittable, connection?: unknown) {
    ready.call(this, connection)
    if (!over) {
      over = true
      done(null)
    }
  }
  sub.handleError = function (this: Submittable, err: Error, connection?: unknown) {
    failed.call(this, err, connection)
    // pg forgets the statement at its error: the ReadyForQuery after it goes to nobody. Anything
    // sent next waits for that ReadyForQuery in pg's own queue, so the statement is over for us.
    if (!over) {
      over = true
      done(isConnectionError(err) ? err : null)
    }
  }
}

/** Fail a submittable that never reached a connection, the way pg fails its queued queries. */
export function failSubmittable (sub: Submittable, err: Error): void {
  // On the next tick: the caller has the stream back and its 'error' listener on by then.
  process.nextTick(() => sub.handleError(err))
}

/**
 * Ask a stream that nobody reads any more to stop. A cursor (pg-cursor, pg-query-stream) closes its
 * portal: the server ends the statement and the connection is reusable. Returns false for the
 * others (COPY): their backend may be blocked writing to a socket nobody reads, which neither a
 * CancelRequest nor anything else sent on the connection can reach; only closing it does.
 */
export function tryCloseCursor (sub: Submittable): boolean {
  const cursor = typeof sub.close === 'function' ? sub : sub.cursor
  if (cursor === undefined || typeof cursor.close !== 'function') return false
  cursor.close(() => {})
  return true
}

/** Close the client's socket now: the backend's next read or write fails and it ends. */
export function cutConnection (client: PoolClient): void {
  (client as unknown as { connection?: { stream?: { destroy (): void } } }).connection?.stream?.destroy()
}
