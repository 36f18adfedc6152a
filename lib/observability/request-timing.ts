import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { leaseOf } from '../hooks.js'
import { type DbTime, NO_DB_TIME } from './lease-activity.js'

/**
 * Per-request database time (`logDbTime`, `serverTiming`). Each adds its hook only when it is on:
 * off, a request pays nothing here.
 */
export function addRequestTiming (fastify: FastifyInstance, options: { logDbTime: boolean, serverTiming: boolean }): void {
  if (options.logDbTime) {
    // Fastify writes its "request completed" line with reply.log after the onResponse hooks have
    // run (log-controller.js, requestCompleted): a child logger put there carries `db` onto that
    // very line, instead of a second line per request. By then the response is written, so a
    // streamed body's statements are in. (An aborted request gets no onResponse, and Fastify
    // writes no completion line for it either.)
    fastify.addHook('onResponse', function logDbTime (request, reply, done) {
      reply.log = reply.log.child({ db: timeOf(request) })
      done()
    })
  }
  if (options.serverTiming) {
    // Added after the plugin's own onSend, so a route transaction's COMMIT is in: headers are
    // still open here. A streamed body's later statements can't be: the headers are gone by then.
    fastify.addHook('onSend', function serverTiming (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: null, payload: unknown) => void) {
      const header = serverTimingOf(timeOf(request))
      const existing = reply.getHeader('server-timing')
      reply.header('server-timing', existing === undefined ? header : `${String(existing)}, ${header}`)
      done(null, payload)
    })
  }
}

function timeOf (request: FastifyRequest): DbTime {
  return leaseOf(request)?.activity?.time() ?? NO_DB_TIME
}

/** `db;dur=4.12;desc="3 queries", db-wait;dur=0.05`: durations in ms, as Server-Timing has them. */
export function serverTimingOf (time: DbTime): string {
  return `db;dur=${time.ms};desc="${time.queries} ${time.queries === 1 ? 'query' : 'queries'}", db-wait;dur=${time.waitMs}`
}
