import type { FastifyReply, FastifyRequest } from 'fastify'

/** Where a request's response stands, as the lease needs to know it to give its client back. */

/** A payload Fastify will pipe (a stream may go on reading from the request's client). */
export function isStream (payload: unknown): boolean {
  return payload !== null && typeof payload === 'object' && typeof (payload as { pipe?: unknown }).pipe === 'function'
}

/** The response was sent, or can't be: its connection is gone. */
export function responseEnded (request: FastifyRequest, reply: FastifyReply): boolean {
  return reply.raw.writableEnded || connectionGone(request, reply)
}

/** The response can't be sent any more: the client went away, or the connection was cut. */
export function connectionGone (request: FastifyRequest, reply: FastifyReply): boolean {
  const res = reply.raw
  // A pipelined request's response has no socket of its own until the ones before it are sent.
  return res.destroyed || (res.socket ?? request.raw.socket)?.destroyed === true
}
