/**
 * `request.kysely`: Kysely on the request's connection (`fastify-request-db/kysely`). Kept out of
 * the main entry so that an app without Kysely installs and loads none of it.
 *
 * Every statement of a request's Kysely runs on `request.db`: on the request's one backend, seen by
 * the plugin (session-state tracking, the route's COMMIT), its `transaction()` and `connection()`
 * included (a transaction inside a route transaction becomes a savepoint). How it is bound, cheaply:
 * kysely-dialect.ts.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { Kysely } from 'kysely'
import { FST_REQUEST_DB_INVALID_OPTION } from '../errors.js'
import { kyselyFactory, type RequestKyselyOptions } from './kysely-dialect.js'

export { kyselyFactory, type RequestKyselyOptions } from './kysely-dialect.js'

/**
 * The database type of `request.kysely`. Declare yours once, anywhere in the app, by merging it in:
 *
 * ```ts
 * declare module 'fastify-request-db/kysely' {
 *   interface KyselyDatabase extends DB {} // DB: kysely-codegen's, or written by hand
 * }
 * ```
 */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface KyselyDatabase {}

declare module 'fastify' {
  interface FastifyRequest {
    /**
     * A `Kysely<KyselyDatabase>` on this request's connection (fastify-request-db/kysely), built at
     * first use and kept for the rest of the request.
     */
    kysely: Kysely<KyselyDatabase>
  }
}

// Where the getter keeps the request's Kysely once built.
const kKysely = Symbol('fastify-request-db.kysely')
type WithKysely = FastifyRequest & { [kKysely]?: Kysely<KyselyDatabase> }

async function requestKyselyPlugin (fastify: FastifyInstance, options: RequestKyselyOptions): Promise<void> {
  const bind = kyselyFactory<KyselyDatabase>(checkOptions(options))
  // A getter on the request prototype: a route that never reads request.kysely builds nothing and
  // copies nothing onto its request (Fastify copies decorator values onto every request).
  fastify.decorateRequest('kysely', {
    getter (this: WithKysely) {
      const built = this[kKysely]
      if (built !== undefined) return built
      const db = this.db
      // null, as request.db is, in an onRequest hook that runs before fastify-request-db's.
      if (db === null) return null as unknown as Kysely<KyselyDatabase>
      return (this[kKysely] = bind(db))
    }
  })
}

function checkOptions (options: RequestKyselyOptions): RequestKyselyOptions {
  const { cursor, plugins, log } = options
  if (cursor !== undefined && typeof cursor !== 'function') {
    throw new FST_REQUEST_DB_INVALID_OPTION('cursor', typeof cursor, "must be pg-cursor's Cursor class")
  }
  if (plugins !== undefined && !Array.isArray(plugins)) {
    throw new FST_REQUEST_DB_INVALID_OPTION('plugins', typeof plugins, 'must be an array of Kysely plugins')
  }
  if (log !== undefined && typeof log !== 'function' && !Array.isArray(log)) {
    throw new FST_REQUEST_DB_INVALID_OPTION('log', typeof log, "must be an array of levels ('query', 'error') or a function")
  }
  return { cursor, plugins, log }
}

/**
 * `request.kysely`; register after fastify-request-db.
 *
 * ```ts
 * await app.register(requestDb)
 * await app.register(requestKysely, { cursor: Cursor })
 * app.get('/users', (request) => request.kysely.selectFrom('users').selectAll().execute())
 * ```
 */
export const requestKysely = fp<RequestKyselyOptions>(requestKyselyPlugin, {
  fastify: '5.x',
  name: 'fastify-request-db-kysely',
  dependencies: ['fastify-request-db']
})

export default requestKysely
