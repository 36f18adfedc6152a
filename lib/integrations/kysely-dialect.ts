/**
 * The Kysely pieces behind `request.kysely`: everything is built once per app except the
 * connection, which is the request's `request.db`.
 *
 * `new Kysely({ dialect: new PostgresDialect({ pool: request.db }) })` in each request works (and
 * is tested), but builds a whole Kysely and initialises its driver every time: about 9 µs of CPU per
 * request (measured with a stub connection), a fifth of a one-query route, which misses the 0.97
 * budget line against the same route on a module-level pool. Here the compiler, adapter, plugins and
 * driver are the app's, and a request gets one object (its connection, which is also the
 * connection provider) and an executor bound to it, through Kysely's public custom-dialect
 * contracts: about 1.4 µs.
 */
import {
  CompiledQuery,
  type ConnectionProvider,
  type DatabaseConnection,
  DefaultQueryExecutor,
  type Dialect,
  Kysely,
  type KyselyPlugin,
  Log,
  type LogConfig,
  PostgresAdapter,
  type PostgresCursor,
  type PostgresCursorConstructor,
  PostgresDriver,
  PostgresIntrospector,
  PostgresQueryCompiler,
  type QueryResult
} from 'kysely'
import type { Submittable } from 'pg'
import { now } from '../clock.js'
import type { RequestDb } from '../lease.js'

/** What a request's Kysely is built from: the app's, made once by `kyselyFactory`. */
export interface BindingSettings {
  readonly cursor: PostgresCursorConstructor | null
  readonly log: Log | null
}

/**
 * A request's connection, as Kysely sees it. It is its own connection provider: every statement of
 * a query, a `transaction()` or a `connection()` goes to the one `request.db`, which takes the pool
 * client at first use and gives it back when the request ends; there is nothing to release here.
 */
export class RequestDbConnection implements DatabaseConnection, ConnectionProvider {
  private readonly db: RequestDb
  private readonly settings: BindingSettings

  constructor (db: RequestDb, settings: BindingSettings) {
    this.db = db
    this.settings = settings
  }

  provideConnection<T> (consumer: (connection: DatabaseConnection) => Promise<T>): Promise<T> {
    return consumer(this)
  }

  executeQuery<R> (compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const log = this.settings.log
    return log === null ? this.run<R>(compiledQuery) : logged(log, compiledQuery, () => this.run<R>(compiledQuery))
  }

  async * streamQuery<R> (compiledQuery: CompiledQuery, chunkSize?: number): AsyncIterableIterator<QueryResult<R>> {
    const Cursor = this.settings.cursor
    if (Cursor === null) {
      throw new Error("fastify-request-db/kysely: .stream() needs pg-cursor: register the plugin with { cursor: Cursor } (import Cursor from 'pg-cursor')")
    }
    if (!Number.isInteger(chunkSize) || (chunkSize as number) <= 0) throw new Error('chunkSize must be a positive integer')
    // request.db counts the cursor as a statement in flight until it is closed (streams.ts).
    const cursor = this.db.query(new Cursor<R>(compiledQuery.sql, compiledQuery.parameters.slice()) as PostgresCursor<R> & Submittable)
    const log = this.settings.log
    const started = now()
    let failed = false
    try {
      for (;;) {
        const rows = await cursor.read(chunkSize as number)
        if (rows.length === 0) break
        yield { rows }
      }
    } catch (error) {
      failed = true
      await log?.error(() => ({ level: 'error', error, query: compiledQuery, queryDurationMillis: now() - started }))
      throw error
    } finally {
      await cursor.close()
      if (!failed) await log?.query(() => ({ level: 'query', isStream: true, query: compiledQuery, queryDurationMillis: now() - started }))
    }
  }

  /** As Kysely's own PostgresConnection answers, which PostgresDriver's COMMIT relies on. */
  private async run<R> (compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const { command, rowCount, rows } = await this.db.query(compiledQuery.sql, compiledQuery.parameters.slice())
    // PostgresDriver.commitTransaction reads the command of COMMIT: ROLLBACK means a statement in
    // the transaction had failed, and it throws AbortedTransactionError instead of reporting success.
    if (command === 'ROLLBACK' || command === 'COMMIT') return { rows: [{ command }] as R[] }
    return {
      numAffectedRows: command === 'INSERT' || command === 'UPDATE' || command === 'DELETE' || command === 'MERGE'
        ? BigInt(rowCount ?? 0)
        : undefined,
      // undefined for a statement pg answered with several results (a savepoint's ROLLBACK TO + RELEASE).
      rows: (rows ?? []) as R[]
    }
  }
}

async function logged<R> (log: Log, query: CompiledQuery, run: () => Promise<QueryResult<R>>): Promise<QueryResult<R>> {
  const started = now()
  let result: QueryResult<R>
  try {
    result = await run()
  } catch (error) {
    await log.error(() => ({ level: 'error', error, query, queryDurationMillis: now() - started }))
    throw error
  }
  await log.query(() => ({ level: 'query', query, queryDurationMillis: now() - started }))
  return result
}

/**
 * Kysely's PostgresDriver for BEGIN (with its isolation level), COMMIT (and its aborted-transaction
 * check) and savepoints. It never takes a connection: the connection provider above hands out the
 * request's. Only ROLLBACK differs: Kysely's marks its own pg connection class as discarded when
 * ROLLBACK fails, through a method the request's connection lacks; the request already closes a
 * connection whose ROLLBACK failed, so the ROLLBACK's own error is what the caller sees.
 */
class RequestDbDriver extends PostgresDriver {
  constructor () {
    super({ pool: noPool })
  }

  override async rollbackTransaction (connection: DatabaseConnection): Promise<void> {
    await connection.executeQuery(CompiledQuery.raw('rollback'))
  }
}

const noPool = {
  connect (): Promise<never> {
    return Promise.reject(new Error('fastify-request-db/kysely: a request\'s Kysely runs on request.db and takes no pool connection'))
  },
  end (): Promise<void> {
    return Promise.resolve()
  }
}

// Never reached: every request's executor is bound to its own connection provider.
const unbound: ConnectionProvider = {
  provideConnection () {
    return Promise.reject(new Error('fastify-request-db/kysely: no request connection is bound'))
  }
}

/** Options of `kyselyFactory` and of the `fastify-request-db/kysely` plugin. */
export interface RequestKyselyOptions {
  /** pg-cursor's `Cursor`, for `.stream()`. Default: none (`.stream()` then fails, saying so). */
  cursor?: PostgresCursorConstructor
  /** Kysely plugins (CamelCasePlugin, …), as in `new Kysely({ plugins })`. Default: none. */
  plugins?: KyselyPlugin[]
  /** Kysely's `log` setting (levels, or a function), as in `new Kysely({ log })`. Default: none. */
  log?: LogConfig
}

/**
 * Build, once, what every request's Kysely shares, and return the function that binds a
 * `Kysely<DB>` to one request's `request.db`.
 */
export function kyselyFactory<DB> (options: RequestKyselyOptions = {}): (db: RequestDb) => Kysely<DB> {
  const compiler = new PostgresQueryCompiler()
  const adapter = new PostgresAdapter()
  const driver = new RequestDbDriver()
  const dialect: Dialect = {
    createAdapter: () => adapter,
    createDriver: () => driver,
    createQueryCompiler: () => compiler,
    createIntrospector: (kysely) => new PostgresIntrospector(kysely)
  }
  const plugins = options.plugins ?? []
  const config = Object.freeze({ dialect, plugins, log: options.log })
  const settings: BindingSettings = Object.freeze({
    cursor: options.cursor ?? null,
    log: options.log === undefined ? null : new Log(options.log)
  })
  const executor = new DefaultQueryExecutor(compiler, adapter, unbound, plugins)
  return (db) => new Kysely<DB>({ config, dialect, driver, executor: executor.withConnectionProvider(new RequestDbConnection(db, settings)) })
}
