import fp from 'fastify-plugin'
import './augment.js'
import { requestDbPlugin } from './plugin.js'
import type { RequestDbOptions } from './options.js'

/**
 * fastify-request-db: one PostgreSQL pool for the app, one lazily taken client per request,
 * always given back.
 */
export const requestDb = fp<RequestDbOptions>(requestDbPlugin, {
  fastify: '5.x',
  name: 'fastify-request-db'
})

export default requestDb

export * from './errors.js'
export type { AppDb } from './app-db.js'
export type { RequestDb, RequestDbClient, RouteDbConfig } from './lease.js'
export type { DbHealth, DbHealthOptions } from './observability/health.js'
export type { Env, RequestDbOptions } from './options.js'
export type { DbStats } from './pool.js'
export type { PostgresPool } from './postgres-pool.js'
export type { DbContext, DbContextFunction, DbSettingValue } from './request-context.js'
export type { DbSession } from './session.js'
export type { ReplicaReads, ReplicaStatus } from './replicas.js'
