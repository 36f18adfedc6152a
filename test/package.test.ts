// The built package (dist/, made by `npm run build`, which `npm test` runs first) loads both ways.
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import t from 'tap'
import { adminUrl } from './helpers/db.js'

const root = new URL('..', import.meta.url).pathname
const built = existsSync(new URL('../dist/esm/index.js', import.meta.url)) && existsSync(new URL('../dist/cjs/index.js', import.meta.url))

t.test('built output exists (npm test builds first)', async (t) => {
  t.ok(built, 'dist/esm and dist/cjs are there')
})

const program = (load: string): string => `
${load}
const Fastify = require('fastify')
;(async () => {
  const app = Fastify()
  await app.register(plugin, { env: { DATABASE_URL: process.env.DATABASE_URL } })
  app.get('/', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
  const res = await app.inject('/')
  await app.close()
  console.log(JSON.stringify({ kind: typeof plugin, same: plugin === named, body: res.json() }))
})().catch((err) => { console.error(err); process.exit(1) })
`

t.test('require("fastify-request-db"): default and named export, registers and serves', async (t) => {
  const out = execFileSync(process.execPath, ['-e', program(`
    const mod = require('fastify-request-db')
    const plugin = mod.default
    const named = mod.requestDb`)], { cwd: root, env: { ...process.env, DATABASE_URL: adminUrl } }).toString()
  t.same(JSON.parse(out), { kind: 'function', same: true, body: { one: 1 } })
})

t.test('require("fastify-request-db") handed straight to register() works too', async (t) => {
  const out = execFileSync(process.execPath, ['-e', program(`
    const plugin = require('fastify-request-db')
    const named = plugin`).replace("typeof plugin", "typeof plugin.default")], { cwd: root, env: { ...process.env, DATABASE_URL: adminUrl } }).toString()
  t.same(JSON.parse(out).body, { one: 1 })
})

t.test('import requestDb from "fastify-request-db" (ESM)', async (t) => {
  const source = `
    import plugin, { requestDb as named, FST_REQUEST_DB_RELEASED } from 'fastify-request-db'
    import Fastify from 'fastify'
    const app = Fastify()
    await app.register(plugin, { env: { DATABASE_URL: process.env.DATABASE_URL } })
    app.get('/', async (request) => (await request.db.query('SELECT 1 AS one')).rows[0])
    const res = await app.inject('/')
    await app.close()
    console.log(JSON.stringify({ kind: typeof plugin, same: plugin === named, code: new FST_REQUEST_DB_RELEASED().code, body: res.json() }))
  `
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', source], { cwd: root, env: { ...process.env, DATABASE_URL: adminUrl } }).toString()
  t.same(JSON.parse(out), { kind: 'function', same: true, code: 'FST_REQUEST_DB_RELEASED', body: { one: 1 } })
})

// The query-builder adapters are subpaths: the main entry loads neither Kysely nor Drizzle.
const builders = (load: string): string => `
${load}
;(async () => {
  const app = Fastify()
  await app.register(requestDb, { env: { DATABASE_URL: process.env.DATABASE_URL } })
  await app.register(requestKysely)
  app.get('/', async (request) => ({
    kysely: (await sql\`SELECT 1 AS one\`.execute(request.kysely)).rows[0].one,
    same: (await sql\`SELECT 2 AS two\`.execute(kyselyFactory()(request.db))).rows[0].two,
    drizzle: (await createDrizzle(request.db).execute(sql\`SELECT 3 AS three\`)).rows[0].three
  }))
  const res = await app.inject('/')
  await app.close()
  console.log(JSON.stringify({ kind: typeof requestKysely, body: res.json() }))
})().catch((err) => { console.error(err); process.exit(1) })
`

t.test('require("fastify-request-db") loads neither kysely nor drizzle-orm', async (t) => {
  const out = execFileSync(process.execPath, ['-e', `
    require('fastify-request-db')
    const loaded = Object.keys(require.cache)
    console.log(JSON.stringify(['/kysely/', '/drizzle-orm/'].map((p) => loaded.some((f) => f.includes('/node_modules' + p)))))
  `], { cwd: root }).toString()
  t.same(JSON.parse(out), [false, false])
})

t.test('require("fastify-request-db/kysely") and "fastify-request-db/drizzle" (CommonJS)', async (t) => {
  const out = execFileSync(process.execPath, ['-e', builders(`
    const Fastify = require('fastify')
    const requestDb = require('fastify-request-db').default
    const { default: requestKysely, kyselyFactory } = require('fastify-request-db/kysely')
    const { createDrizzle } = require('fastify-request-db/drizzle')
    const { sql } = require('kysely')`).replace('createDrizzle(request.db).execute(sql', 'createDrizzle(request.db).execute(require("drizzle-orm").sql')],
  { cwd: root, env: { ...process.env, DATABASE_URL: adminUrl } }).toString()
  t.same(JSON.parse(out), { kind: 'function', body: { kysely: 1, same: 2, drizzle: 3 } })
})

t.test('import from "fastify-request-db/kysely" and "fastify-request-db/drizzle" (ESM)', async (t) => {
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', builders(`
    import Fastify from 'fastify'
    import requestDb from 'fastify-request-db'
    import requestKysely, { kyselyFactory, requestKysely as named } from 'fastify-request-db/kysely'
    import { createDrizzle } from 'fastify-request-db/drizzle'
    import { sql } from 'kysely'
    import { sql as drizzleSql } from 'drizzle-orm'
    if (named !== requestKysely) throw new Error('default and named export differ')`).replace('createDrizzle(request.db).execute(sql', 'createDrizzle(request.db).execute(drizzleSql')],
  { cwd: root, env: { ...process.env, DATABASE_URL: adminUrl } }).toString()
  t.same(JSON.parse(out), { kind: 'function', body: { kysely: 1, same: 2, drizzle: 3 } })
})
