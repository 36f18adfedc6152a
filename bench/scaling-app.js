// One app instance for bench/scaling.js and bench/topology.js: the plugin with the settings it is
// given in its environment (DATABASE_URL, DB_POOL_MAX, DB_POOLER, DATABASE_REPLICA_URLS, …), on a
// free port; says { type: 'ready', port } when it listens and closes on 'close'.
import Fastify from 'fastify'
import requestDb from '../dist/esm/index.js'

const app = Fastify({ logger: false })
await app.register(requestDb)
const LOOKUP = 'SELECT id, name FROM items WHERE id = $1'
app.get('/q', async (request) => (await request.db.query(LOOKUP, [1 + (Number(request.query.n) || 7) % 1000])).rows[0])
app.get('/ro', { config: { db: { readOnly: true } } }, async (request) => (await request.db.query(LOOKUP, [1 + (Number(request.query.n) || 7) % 1000])).rows[0])
// A statement that holds its connection 5 ms without using the server's CPU: a query that waits on
// I/O or locks, where the number of connections, not the CPU, sets the pace.
app.get('/wait', async (request) => (await request.db.query('SELECT pg_sleep(0.005) AS slept')).rows[0])
await app.listen({ port: 0, host: '127.0.0.1' })
process.send({ type: 'ready', port: app.server.address().port })
process.on('message', async (msg) => {
  if (msg === 'close') {
    await app.close()
    process.exit(0)
  }
})
