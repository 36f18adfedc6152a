import Fastify, { type FastifyRequest } from 'fastify'
import type { PoolClient, QueryResult } from 'pg'
import Cursor from 'pg-cursor'
import { to as copyTo } from 'pg-copy-streams'
import QueryStream from 'pg-query-stream'
import { expectAssignable, expectError, expectNotAssignable, expectType } from 'tsd'
import requestDb, {
  type DbContext,
  type DbContextFunction,
  type DbHealth,
  type DbSession,
  type DbStats,
  FST_REQUEST_DB_ACQUIRE_TIMEOUT,
  type RequestDb,
  type ReplicaStatus,
  type RequestDbOptions,
  requestDb as named
} from '../dist/esm/index.js'

expectType<typeof requestDb>(named)

const app = Fastify()
await app.register(requestDb, { max: 5, acquireTimeoutMs: 100, env: { DATABASE_URL: 'postgres://localhost/x' } })
await app.register(requestDb)

// Options are checked.
expectAssignable<RequestDbOptions>({ connectionString: 'postgres://x', maxWaiting: 0, shutdownTimeoutMs: 1 })
expectNotAssignable<RequestDbOptions>({ max: '10' })
expectNotAssignable<RequestDbOptions>({ acquireTimeoutMS: 10 })
expectError(app.register(requestDb, { max: 'ten' }))
expectAssignable<RequestDbOptions>({ connectTimeoutMs: 30000, leakDetectionMs: 5000, logDbTime: true, serverTiming: false })
expectNotAssignable<RequestDbOptions>({ logDbTime: 'true' })
expectNotAssignable<RequestDbOptions>({ leakDetectionMs: '5s' })

// app.db
expectType<DbStats>(app.db.stats())
expectType<number>(app.db.stats().leased)
expectType<number>(app.db.stats().leaksDetected)
expectType<Promise<DbHealth>>(app.db.health())
expectType<Promise<DbHealth>>(app.db.health({ timeoutMs: 1000 }))
expectError(app.db.health({ timeoutMs: '1s' }))
const health = await app.db.health()
expectType<boolean>(health.ok)
expectType<number | null>(health.latencyMs)
expectType<DbStats>(health.pool)
expectType<string | undefined>(health.error?.code)
expectType<Promise<QueryResult<{ n: number }>>>(app.db.query<{ n: number }>('SELECT 1 AS n'))
expectType<Promise<string>>(app.db.transaction(async (tx) => {
  expectType<DbSession>(tx)
  return 'done'
}))

// request.db: rows typed by the generic; route config typed.
app.get('/', { config: { db: { transaction: true } } }, async (request) => {
  expectType<RequestDb>(request.db)
  const { rows } = await request.db.query<{ id: number, name: string }>('SELECT id, name FROM t WHERE id = $1', [1])
  expectType<number>(rows[0].id)
  expectType<string>(rows[0].name)
  expectError(rows[0].missing)
  expectType<Promise<PoolClient>>(request.db.client())
  // A stream comes back as itself, as from pg's client.query.
  expectType<QueryStream>(request.db.query(new QueryStream('SELECT 1')))
  expectType<Cursor<{ n: number }>>(request.db.query(new Cursor<{ n: number }>('SELECT 1 AS n')))
  expectType<ReturnType<typeof copyTo>>(request.db.query(copyTo('COPY t TO STDOUT')))
  expectError(request.db.query({ submit: 'not a function' }))
  const face = await request.db.connect()
  expectType<Promise<QueryResult<{ n: number }>>>(face.query<{ n: number }>('SELECT 1 AS n'))
  expectType<void>(face.release())
  const inner = await request.db.transaction(async (tx) => {
    expectType<RequestDb>(tx)
    return 42
  })
  expectType<number>(inner)
  return rows
})
expectError(app.get('/', { config: { db: { transaction: 'yes' } } }, async () => 'x'))

// Read replicas: a readOnly route, request.db.replica (query only), app.db.replicas, the options.
app.get('/report', { config: { db: { readOnly: true } } }, async (request) => {
  const { rows } = await request.db.replica.query<{ n: number }>('SELECT 1 AS n')
  expectType<number>(rows[0].n)
  expectError(request.db.replica.transaction)
  return rows
})
expectError(app.get('/', { config: { db: { readOnly: 'yes' } } }, async () => 'x'))
expectType<ReplicaStatus[]>(app.db.replicas)
expectType<boolean>(app.db.replicas[0].usable)
expectType<number | null>(app.db.replicas[0].lagMs)
expectAssignable<RequestDbOptions>({ pooler: 'transaction', replicaUrls: ['postgres://r/app'], maxReplicaLagMs: 1000 })
expectError(app.register(requestDb, { pooler: 'session' }))
expectError(app.register(requestDb, { replicaUrls: 'postgres://r/app' }))

// Error codes are typed constructors.
const err = new FST_REQUEST_DB_ACQUIRE_TIMEOUT(100)
expectType<'FST_REQUEST_DB_ACQUIRE_TIMEOUT'>(err.code)

// The database context (#17): settings of strings, numbers, booleans, a role; null for none; async allowed.
expectAssignable<RequestDbOptions>({ context: (request: FastifyRequest) => ({ settings: { 'app.tenant_id': String(request.id), 'app.level': 3, 'app.admin': false }, role: 'tenant_user' }), contextRoles: ['tenant_user'] })
expectAssignable<RequestDbOptions>({ context: async () => null })
expectNotAssignable<RequestDbOptions>({ context: () => ({ settings: { 'app.tenant_id': { id: 1 } } }) })
expectNotAssignable<RequestDbOptions>({ context: () => ({ role: 42 }) })
expectNotAssignable<RequestDbOptions>({ contextRoles: 'tenant_user' })
expectNotAssignable<RequestDbOptions>({ context: { settings: {} } })
expectAssignable<DbContextFunction>(() => ({ settings: { 'app.tenant_id': 'a' } }))
app.get('/no-context', { config: { db: { context: false } } }, async () => 'ok')
app.get('/own-context', { config: { db: { context: () => ({ role: 'tenant_user' }) } } }, async () => 'ok')
expectError(app.get('/bad-context', { config: { db: { context: true } } }, async () => 'ok'))
expectType<Promise<number>>(app.db.withContext({ settings: { 'app.tenant_id': 'a' } }, async (tx) => (await tx.query<{ n: number }>('SELECT 1 AS n')).rows[0].n))
expectError(app.db.withContext({ settings: { 'app.tenant_id': [1] } }, async () => 1))
expectType<DbContext | undefined>(undefined as DbContext | undefined)
