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

/** Put another lease in the request's place (a read-only route's, on a replica: replicas.ts). */
export function setLease (request: FastifyRequest, lease: Lease): void {
  (request as WithLease)[kLease] = lease
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
    const code = ownCode(error)
    if (code !== undefined && RETRYABLE_CODES.has(code) && !reply.hasHeader('retry-after')) {
      reply.header('retry-after', '1')
    }
    done()
  })

  // Global, not added per route in onRoute: routes declared before this plugin finished loading
  // (after a register() that was not awaited) never reach an onRoute hook, and would silently miss
  // their COMMIT (the @fastify/postgres trap).
  fastify.addHook('onSend', function commitAndRelease (request: WithLease, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) {
    const lease = request[kLease]
    // A stream on a transaction route commits at its end, not here (Lease.settleAtStreamEnd); but
    // Fastify sends no body for a 204, a 304 or a HEAD, and only drains the stream: that commits here.
    if (lease !== undefined && isStream(payload) && sendsBody(request, reply.statusCode) && lease.isTransactionRoute()) {
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

function sendsBody (request: FastifyRequest, status: number): boolean {
  return status !== 204 && status !== 304 && status >= 200 && request.method !== 'HEAD'
}

type MaybeTyped = { code?: unknown, statusCode?: unknown, cause?: unknown }

/**
 * The code of this plugin's error behind `error`: its own, or its cause's when `error` merely wraps
 * one of ours and has no status of its own. Drizzle wraps every error its driver returns in a
 * DrizzleQueryError (ours becomes its `cause`), which Fastify would answer with a 500 and no
 * Retry-After: a typed 503 would stop being one. The wrapper is lent our status and code, so the
 * client sees what it would have seen without the query builder; its message is left as it is.
 */
function ownCode (error: MaybeTyped): string | undefined {
  if (typeof error.code === 'string') return error.code
  const cause = error.cause as MaybeTyped | null | undefined
  if (error.statusCode !== undefined || typeof cause?.code !== 'string' || !cause.code.startsWith('FST_REQUEST_DB_')) return undefined
  error.statusCode = cause.statusCode
  error.code = cause.code
  return cause.code
}
