// The app under soak: an example-like service on fastify-request-db, in its own process so the
// driver can measure its memory and stop it like a deploy would. Parent ↔ child over IPC.
import Fastify from 'fastify'
import requestDb from 'fastify-request-db'

const app = Fastify({ logger: { level: process.env.SOAK_LOG_LEVEL ?? 'fatal' }, handlerTimeout: 1000 })
await app.register(requestDb, {
  connectionString: process.env.DATABASE_URL,
  max: Number(process.env.SOAK_POOL_MAX ?? 10),
  acquireTimeoutMs: 1000,
  shutdownTimeoutMs: 3000
})

app.get('/read', async (request) => {
  const { rows } = await request.db.query('SELECT count(*)::int AS n FROM soak_writes')
  return rows[0]
})

// One row per request id, in the route's transaction: 2xx means committed.
app.post('/write/:id', { config: { db: { transaction: true } } }, async (request, reply) => {
  await request.db.query('INSERT INTO soak_writes (id) VALUES ($1)', [request.params.id])
  await request.db.query('SELECT pg_sleep(0.005)')
  return reply.code(201).send({ id: request.params.id })
})

// Writes, then throws: must be rolled back.
app.post('/write-then-throw/:id', { config: { db: { transaction: true } } }, async (request) => {
  await request.db.query('INSERT INTO soak_writes (id) VALUES ($1)', [request.params.id])
  throw new Error('handler failed after writing')
})

// Long enough for the client to give up on it (abort) or for handlerTimeout (1 s) to fire.
app.get('/slow', async (request) => {
  await request.db.query('SELECT pg_sleep(0.3)')
  return { ok: true }
})
app.get('/too-slow', async (request) => {
  await request.db.query('SELECT pg_sleep(3)')
  return { ok: true }
})

await app.listen({ port: 0, host: '127.0.0.1' })

let peakRss = process.memoryUsage.rss()
setInterval(() => { peakRss = Math.max(peakRss, process.memoryUsage.rss()) }, 100).unref()

process.on('message', async (msg) => {
  if (msg === 'stats') {
    process.send({ type: 'stats', stats: app.db.stats(), peakRss })
  } else if (msg === 'close') {
    const started = Date.now()
    // Node's HTTP server does not count a connection that never sent a request as idle, and waits
    // for it (headersTimeout, 60 s). A deploy gives close() a deadline; so does this.
    const deadline = setTimeout(() => app.server.closeAllConnections(), 4000)
    await app.close()
    clearTimeout(deadline)
    process.send({ type: 'closed', ms: Date.now() - started, stats: app.db.stats(), peakRss })
    setTimeout(() => process.exit(0), 50)
  }
})
process.send({ type: 'ready', port: app.server.address().port })
