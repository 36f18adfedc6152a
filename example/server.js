// Example: a small accounts service on fastify-request-db.
//   npm start                 # embedded PostgreSQL, port 3000
//   DATABASE_URL=postgres://… PORT=8080 npm start
import Fastify from 'fastify'
import requestDb from 'fastify-request-db'
import { startEmbeddedPostgres } from '../scripts/embedded-postgres.mjs'
import { accountRoutes } from './routes.js'
import { createSchema } from './schema.js'

const log = { level: process.env.LOG_LEVEL ?? 'info' }

let embedded = null
if (!process.env.DATABASE_URL) {
  console.log('No DATABASE_URL: starting an embedded PostgreSQL (first start takes a few seconds)…')
  try {
    embedded = await startEmbeddedPostgres()
  } catch (err) {
    // An EmbeddedPostgresError's message says what failed and what to do; a stack adds nothing.
    console.error(err.name === 'EmbeddedPostgresError' ? err.message : err)
    process.exit(1)
  }
}

const app = Fastify({ logger: log, handlerTimeout: 10_000 })
await app.register(requestDb, {
  env: { ...process.env, DATABASE_URL: process.env.DATABASE_URL ?? embedded.url }
})
await createSchema(app.db)
await app.register(accountRoutes)

let closing = false
async function shutdown (signal) {
  if (closing) return
  closing = true
  app.log.info({ signal }, 'shutting down')
  // The plugin bounds the database side of close() (shutdownTimeoutMs); Node's HTTP server still
  // waits for keep-alive connections that never sent a request (headersTimeout). Cut them after a
  // deadline so a deploy's SIGTERM is answered in seconds.
  const deadline = setTimeout(() => app.server.closeAllConnections(), 12_000)
  try {
    await app.close()
  } finally {
    clearTimeout(deadline)
    if (embedded) await embedded.stop()
  }
  process.exit(0)
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))

const port = Number(process.env.PORT ?? 3000)
try {
  await app.listen({ port, host: process.env.HOST ?? '127.0.0.1' })
} catch (err) {
  app.log.error({ err }, 'could not start')
  await app.close()
  if (embedded) await embedded.stop()
  process.exit(1)
}
console.log(`Accounts example listening on http://127.0.0.1:${app.server.address().port}  (try GET /health, GET /accounts, POST /transfers)`)
