import type { Readable } from 'node:stream'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { RETRYABLE_CODES } from './errors.js'
import { Lease } from './lease.js'
import type { ClientGate } from './pool.js'
import { isStream } from './response-state.js'

// Where onRequest puts the request's lease; `request.db` reads it.
const kLease = Symbol('fastify-request-db.lease')
type WithLease = FastifyRequest & { [kLease]?: Lease }

/** The request's lease, for the plugin's other hooks (lib/observability/); undefined before onRequest. */
export function leaseOf (request: FastifyRequest): Lease | undefined {
  return (request as WithLease)[kLease]
}

/**
 * `request.db` and the request-side hooks. onRequest only allocates the handle: the pool is
 * touched at first use, so slow bodies and db-less routes hold no connection. onSend commits a
 * route transaction and gives the client back as soon as the payload is ready (Fastify runs it for
 * aborted requests too). The rest is the lease's (lease.ts): a client still in use after onSend (a
 * stream) goes back when the response closes, and the gate's sweep finds requests whose client went
 * away and, after a short grace, cancels their statements. Neither onResponse (skipped on abort)
 * nor onRequestAbort (documented as not completely reliable) is relied on.
 */
export function addRequestHooks (fastify: FastifyInstance, gate: ClientGate): void {
  // A getter on the request prototype, not a decorator value: Fastify copies decorator values onto
  // every new request with a keyed store, which cost ≈ 360 instructions per request (0.6 % of a
  // route that never touches the database, counted with callgrind).
  fastify.decorateRequest('db', {
    // null where this plugin's onRequest has not run (an earlier onRequest hook failed).
    getter (this: WithLease) { return (this[kLease] ?? null) as Lease },
    // Assigning request.db (a test double, a wrapper) changes what code reads from then on; the
    // plugin keeps its own lease, and gives its client back as before.
    setter (this: WithLease, value: unknown) {
      Object.defineProperty(this, 'db', { value, writable: true, enumerable: true, configurable: true })
    }
  })

  fastify.addHook('onRequest', function setUpRequestDb (request: WithLease, reply, done) {
    request[kLease] = new Lease(gate, request, reply)
    done()
  })

  fastify.addHook('onError', function noteFailure (request: WithLease, reply, error, done) {
    // undefined when an earlier onRequest hook failed before this plugin's ran.
    const lease = request[kLease]
    if (lease !== undefined) lease.failed = true
    if (RETRYABLE_CODES.has((error as { code?: string }).code ?? '') && !reply.hasHeader('retry-after')) {
      reply.header('retry-after', '1')
    }
    done()
  })

  // Global, not added per route in onRoute: routes declared before this plugin finished loading
  // (after a register() that was not awaited) never reach an onRoute hook, and would silently miss
  // their COMMIT (the @fastify/postgres trap).
  fastify.addHook('onSend', function commitAndRelease (request: WithLease, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) {
    const lease = request[kLease]
    // A stream on a transaction route commits at its end, not here (Lease.settleAtStreamEnd).
    if (lease !== undefined && isStream(payload) && lease.isTransactionRoute()) {
      done(null, lease.settleAtStreamEnd(payload as Readable, reply.statusCode))
      return
    }
    if (lease === undefined || !lease.routeTxOpen) {
      // Synchronous: an async onSend would let a second reply.send() slip through before the first
      // is written.
      lease?.releaseEarly(payload)
      done(null, payload)
      return
    }
    lease.settleThenRelease(reply.statusCode, payload, (err) => {
      // While COMMIT ran, another path may have answered already (handlerTimeout's 503, a second
      // reply.send): writing again would throw ERR_HTTP_HEADERS_SENT and take the process down.
      // Found by the soak run.
      if (err === null) {
        if (!reply.raw.headersSent) done(null, payload)
      } else if (reply.raw.headersSent) {
        request.log.error({ err }, 'fastify-request-db: the transaction failed after another response was sent')
      } else if (lease.tookOverReply) {
        // A hijacked reply no longer goes through Fastify's error handling: answer here.
        request.log.error({ err }, 'fastify-request-db: COMMIT failed')
        const status = (err as { statusCode?: number }).statusCode ?? 500
        reply.raw.writeHead(status, { 'content-type': 'application/json; charset=utf-8' })
        reply.raw.end(JSON.stringify({ statusCode: status, code: (err as { code?: string }).code, error: 'Internal Server Error', message: err.message }))
        // No onSend follows this answer: give the client back now.
        lease.releaseEarly(null)
      } else {
        done(err)
      }
    })
  })
}
