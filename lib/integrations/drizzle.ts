/**
 * Drizzle on the request's connection (`fastify-request-db/drizzle`). Kept out of the main entry so
 * that an app without Drizzle installs and loads none of it.
 *
 * `drizzle({ client: request.db })` works as it is at run time: of its client, Drizzle's node-postgres
 * driver calls only `query(config, values)`, and it takes a connection of its own for
 * `transaction()` only from something that looks like a pool (`instanceof pg.Pool`, or a class
 * named …Pool…), which request.db is not, so its transactions run on the request's connection (as
 * a savepoint inside a route transaction). But its types name pg's `Pool | PoolClient | Client`,
 * so in TypeScript that call needs a cast: `createDrizzle` is the call with the cast in one place.
 */
import type { DrizzleConfig } from 'drizzle-orm'
import { drizzle, type NodePgDatabase } from 'drizzle-orm/node-postgres'
import type { PoolClient } from 'pg'
import type { RequestDb } from '../lease.js'

/**
 * `drizzle({ ...config, client: db })`, typed: a Drizzle database whose every statement runs on
 * `db`, a request's `request.db`. Without a `schema` it is a handful of objects per request; with
 * one, Drizzle reads the schema's tables and relations again at each call (about 1 µs a table).
 */
export function createDrizzle<TSchema extends Record<string, unknown> = Record<string, never>> (
  db: RequestDb, config: DrizzleConfig<TSchema> = {}
): NodePgDatabase<TSchema> & { $client: RequestDb } {
  const database = drizzle<TSchema, PoolClient>({ ...config, client: db as unknown as PoolClient })
  return database as unknown as NodePgDatabase<TSchema> & { $client: RequestDb }
}
