import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { RETRYABLE_CODES } from './errors.js'
import { Lease } from './lease.js'
import type { ClientGate } from './pool.js'

/**
 * The request-side hooks. onRequest only allocates the handle: the pool is touched at first use,
 * so slow bodies and db-less routes hold no connection. onSend commits a route transaction and
 * gives the client back as soon as the payload is ready (Fastify runs it for aborted requests
 * too). The rest is the lease's (lease.ts): a client still in use after onSend (a stream) goes back
 * when the response closes, and the gate's sweep finds requests whose client went away and, after
 * a short grace, cancels their statements. Neither onResponse (skipped on abort) nor
 * onRequestAbort (documented as not completely reliable) is relied on.
 */
export function addRequestHooks (fastify: FastifyInstance, gate: ClientGate): void {
  fastify.addHook('onRequest', function setUpRequestDb (request, reply, done) {
    request.db = new Lease(gate, request, reply)
    done()
  })

  fastify.addHook('onError', function noteFailure (request, reply, error, done) {
    const lease = request.db as Lease | null
    if (lease !== null) lease.failed = true
    if (RETRYABLE_CODES.has((error as { code?: string }).code ?? '') && !reply.hasHeader('retry-after')) {
      reply.header('retry-after', '1')
    }
    done()
  })

  // Global, not added per route in onRoute: routes declared before this plugin finished loading
  // (after a register() that was not awaited) never reach an onRoute hook, and would silently miss
  // their COMMIT (the @fastify/postgres trap).
  fastify.addHook('onSend', function commitAndRelease (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) {
    const lease = request.db as Lease | null
    if (lease === null || !lease.routeTxOpen) {
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
