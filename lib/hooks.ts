import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { RETRYABLE_CODES } from './errors.js'
import { Lease } from './lease.js'
import type { ClientGate } from './pool.js'

/**
 * The request-side hooks. Only onRequest runs for every request, and it only allocates the handle:
 * the pool is touched at first use, so slow bodies and db-less routes hold no connection. Release
 * is driven by the response's 'close' event (see lease.ts), not by a hook that Fastify skips on
 * abort (onResponse) or documents as unreliable (onRequestAbort).
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
    if (lease === null || !lease.holding) {
      done(null, payload)
      return
    }
    const commit = lease.responseReady(reply.statusCode, payload)
    if (commit === null) done(null, payload)
    else commit.then(() => done(null, payload), done)
  })
}
