// Query builders on request.db: Kysely<DB> typed end to end, request.kysely typed by the one
// declared KyselyDatabase, Drizzle through createDrizzle.
import { eq } from 'drizzle-orm'
import type { NodePgDatabase } from 'drizzle-orm/node-postgres'
import { integer, pgTable, text } from 'drizzle-orm/pg-core'
import Fastify from 'fastify'
import { type Generated, Kysely, PostgresDialect, type Selectable } from 'kysely'
import Cursor from 'pg-cursor'
import { expectAssignable, expectError, expectType } from 'tsd'
import requestDb, { type RequestDb } from 'fastify-request-db'
import requestKysely, { kyselyFactory, type RequestKyselyOptions } from 'fastify-request-db/kysely'
import { createDrizzle } from 'fastify-request-db/drizzle'

interface DB {
  person: { id: Generated<number>, first_name: string, age: number | null }
}

// Declared once for the whole app.
declare module 'fastify-request-db/kysely' {
  interface KyselyDatabase extends DB {}
}

const app = Fastify()
await app.register(requestDb)
await app.register(requestKysely, { cursor: Cursor })
expectAssignable<RequestKyselyOptions>({ cursor: Cursor, plugins: [], log: ['query', 'error'] })
expectError(app.register(requestKysely, { cursor: 'pg-cursor' }))

app.get('/', async (request) => {
  // The dialect takes request.db as its pool.
  const kysely = new Kysely<DB>({ dialect: new PostgresDialect({ pool: request.db, cursor: Cursor }) })
  const row = await kysely.selectFrom('person').select(['id', 'first_name']).where('age', '>', 18).executeTakeFirstOrThrow()
  expectType<{ id: number, first_name: string }>(row)
  expectError(kysely.selectFrom('person').select(['id', 'last_name']))
  expectError(kysely.selectFrom('people').selectAll())

  // request.kysely: the same, typed by the declaration above.
  expectType<Kysely<DB>>(request.kysely)
  const people = await request.kysely.selectFrom('person').selectAll().execute()
  expectType<Array<Selectable<DB['person']>>>(people)
  expectType<number | null>(people[0].age)
  expectError(request.kysely.selectFrom('person').select('nickname'))
  expectError(request.kysely.insertInto('person').values({ first_name: 1 }))
  const inner = await request.kysely.transaction().execute(async (trx) => trx.selectFrom('person').select('age').executeTakeFirst())
  expectType<{ age: number | null } | undefined>(inner)
  for await (const streamed of request.kysely.selectFrom('person').select('first_name').stream(100)) {
    expectType<string>(streamed.first_name)
  }
  // Or a DB type of your own per factory, without the declaration.
  const bindOther = kyselyFactory<{ other: { x: string } }>({ cursor: Cursor })
  expectType<Kysely<{ other: { x: string } }>>(bindOther(request.db))
  expectType<string>((await bindOther(request.db).selectFrom('other').select('x').executeTakeFirstOrThrow()).x)
  expectError(bindOther({}))
  expectError(kyselyFactory({ log: 'query' }))

  // Drizzle: createDrizzle(request.db) is drizzle({ client: request.db }), typed.
  const person = pgTable('person', { id: integer('id').primaryKey(), firstName: text('first_name').notNull() })
  const orm = createDrizzle(request.db, { schema: { person } })
  expectAssignable<NodePgDatabase<{ person: typeof person }>>(orm)
  expectType<RequestDb>(orm.$client)
  const found = await orm.select({ name: person.firstName }).from(person).where(eq(person.id, 1))
  expectType<Array<{ name: string }>>(found)
  expectError(orm.select({ name: person.lastName }).from(person))
  return row
})
