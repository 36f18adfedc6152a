import { AsyncResource } from 'node:async_hooks'

/**
 * Which async context (AsyncLocalStorage: OpenTelemetry's active span, a logger's trace id) the
 * plugin's deferred work runs in. A callback runs in the context it was scheduled from, so work
 * for one request that starts from a shared timer or from another request's callback would be
 * recorded in the wrong request's trace. Two rules: work done for a request runs in that request's
 * context (Lease.scope), and timers that serve the whole pool run in the context the plugin was
 * registered in, which is no request's (a scope made by `startupScope` during registration).
 *
 * An AsyncResource, not AsyncLocalStorage.snapshot(): on Node 20 snapshot() is built on
 * AsyncResource.bind, which cost ≈ 60 µs a call in a micro-benchmark; a bare AsyncResource costs
 * ≈ 70 ns to make and as much to enter, and is stable API on every supported Node.
 */
export function startupScope (name: string): AsyncResource {
  return new AsyncResource(`fastify-request-db.${name}`)
}

/**
 * An unref'd setTimeout made inside `scope`: its callback runs there, and the timer holds on to
 * that context only, never to the context of whoever happened to arm it.
 */
export function timeoutIn (scope: AsyncResource, ms: number, fn: () => void): NodeJS.Timeout {
  const timer: NodeJS.Timeout = scope.runInAsyncScope(setTimeout, null, fn, ms)
  timer.unref()
  return timer
}
