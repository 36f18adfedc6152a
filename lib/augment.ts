import type { AppDb } from './app-db.js'
import type { RequestDb, RouteDbConfig } from './lease.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The app's pool and helpers (fastify-request-db). */
    db: AppDb
  }
  interface FastifyRequest {
    /** This request's database handle; its client is taken at first use (fastify-request-db). */
    db: RequestDb
  }
  interface FastifyContextConfig {
    /** fastify-request-db route settings, e.g. `{ transaction: true }`, `{ context: false }`. */
    db?: RouteDbConfig
  }
}

export {}
