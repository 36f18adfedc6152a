import fastifyPostgres from '@fastify/postgres'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { AppDatabase } from './app-db.js'
import { addRequestHooks } from './hooks.js'
import { addRequestTiming } from './observability/request-timing.js'
import { waitForDatabase } from './observability/startup.js'
import { type RequestDbOptions, type ResolvedOptions, resolveOptions } from './options.js'
import { ClientGate } from './pool.js'
import type { PostgresPool } from './postgres-pool.js'
import { createRedactor, loggableError } from './redact.js'
import { addReplicas } from './replicas.js'
import { addShutdownHooks } from './shutdown.js'

/** The lifecycle, in order. Each step lives in the file it names. */
export async function requestDbPlugin (fastify: FastifyInstance, options: RequestDbOptions): Promise<void> {
  const resolved = resolveOptions(options)
  const redact = createRedactor(resolved.secrets)

  const pool = await obtainPool(fastify, resolved)
  const gate = new ClientGate(pool, resolved, fastify.log, redact)
  watchIdleClients(fastify, pool, redact)
  // SELECT 1, so ready() rejects when the database can't be reached (within connectTimeoutMs).
  await waitForDatabase(gate, resolved, fastify.log)

  fastify.decorate('db', new AppDatabase(gate, resolved.target))
  // request.db, and the hooks that hand it out and give its client back.
  addRequestHooks(fastify, gate)
  // Read replicas: a pool and a gate each, lag checked in the background; readOnly routes and
  // request.db.replica go there. After addRequestHooks: its onRequest replaces the lease.
  if (resolved.replicas.length > 0) await addReplicas(fastify, gate, resolved, redact, clientWithConnectTimeout(resolved.acquireTimeoutMs))
  // logDbTime, serverTiming: hooks added only when on. After addRequestHooks: a route
  // transaction's COMMIT comes before the Server-Timing header is set.
  addRequestTiming(fastify, resolved)
  // Added after @fastify/postgres registered: onClose hooks run last-added first, so this one
  // gives every client back before @fastify/postgres ends the pool.
  addShutdownHooks(fastify, gate, resolved.shutdownTimeoutMs)
}

/** The one pool: the caller's, the app's own `fastify.pg`, or a new one owned by @fastify/postgres. */
async function obtainPool (fastify: FastifyInstance, options: ResolvedOptions): Promise<PostgresPool> {
  if (options.pool !== undefined) return options.pool
  const existing = (fastify as { pg?: { pool?: PostgresPool } }).pg?.pool
  if (existing !== undefined) {
    if (options.statementTimeoutMs > 0) {
      fastify.log.warn('fastify-request-db: statementTimeoutMs is not applied to the reused fastify.pg pool')
    }
    return existing
  }
  await fastify.register(fastifyPostgres, {
    ...options.connection,
    max: options.max,
    idleTimeoutMillis: options.idleTimeoutMs,
    // No connectionTimeoutMillis on the pool: it would start a timer on every checkout. The wait
    // for a client is bounded by the gate, and opening a connection by the client itself.
    Client: clientWithConnectTimeout(options.acquireTimeoutMs),
    ...(options.statementTimeoutMs > 0 ? { statement_timeout: options.statementTimeoutMs } : {})
  })
  return (fastify as unknown as { pg: { pool: PostgresPool } }).pg.pool
}

/**
 * pg's Client with a bound on opening its connection (TCP, TLS, authentication): without one, a
 * server that accepts but never answers would hold a pool slot until the OS gives up on the socket.
 */
function clientWithConnectTimeout (ms: number): typeof pg.Client {
  return class TimedClient extends pg.Client {
    constructor (config: pg.ClientConfig = {}) {
      // pg-pool makes the password non-enumerable, which a spread would drop: name it.
      super({ ...config, password: config.password, connectionTimeoutMillis: ms })
    }
  }
}

/**
 * An idle client whose backend dies emits 'error' on the pool; with no listener, Node exits.
 * @fastify/postgres attaches none (fastify-postgres#168).
 */
function watchIdleClients (fastify: FastifyInstance, pool: PostgresPool, redact: (text: string) => string): void {
  pool.on('error', (err) => {
    fastify.log.warn({ err: loggableError(err, redact) },
      'fastify-request-db: an idle database connection failed and was removed from the pool')
  })
}
