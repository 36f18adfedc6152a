// Routes of the accounts example. Each handler uses request.db; the client is taken at the first
// query and given back when the response is done, whatever happens.
import { pipeline } from 'node:stream/promises'
import { from as copyFrom, to as copyTo } from 'pg-copy-streams'

const account = {
  type: 'object',
  properties: { id: { type: 'integer' }, name: { type: 'string' }, balance_cents: { type: 'integer' } }
}

export async function accountRoutes (app) {
  // Reachability for load balancers: 200 when a query goes through, 503 otherwise.
  app.get('/health', async (request, reply) => {
    try {
      await request.db.query('SELECT 1')
      return { status: 'ok', pool: app.db.stats() }
    } catch (err) {
      request.log.warn({ err }, 'health check failed')
      return reply.code(503).send({ status: 'unavailable', code: err.code })
    }
  })

  app.get('/accounts', { schema: { response: { 200: { type: 'array', items: account } } } }, async (request) => {
    const { rows } = await request.db.query('SELECT id, name, balance_cents::int FROM accounts ORDER BY id')
    return rows
  })

  app.get('/accounts/:id', {
    schema: { params: { type: 'object', properties: { id: { type: 'integer' } } }, response: { 200: account } }
  }, async (request, reply) => {
    const { rows } = await request.db.query('SELECT id, name, balance_cents::int FROM accounts WHERE id = $1', [request.params.id])
    if (rows.length === 0) return reply.code(404).send({ error: 'no such account' })
    return rows[0]
  })

  app.post('/accounts', {
    schema: {
      body: {
        type: 'object',
        required: ['name'],
        properties: { name: { type: 'string', minLength: 1, maxLength: 100 }, balance_cents: { type: 'integer', minimum: 0, default: 0 } }
      },
      response: { 201: account }
    }
  }, async (request, reply) => {
    try {
      const { rows } = await request.db.query(
        'INSERT INTO accounts (name, balance_cents) VALUES ($1, $2) RETURNING id, name, balance_cents::int',
        [request.body.name, request.body.balance_cents])
      return reply.code(201).send(rows[0])
    } catch (err) {
      if (err.code === '23505') return reply.code(409).send({ error: 'name taken' })
      throw err
    }
  })

  // The whole request is one transaction (config.db.transaction): committed before the response
  // if the handler returns, rolled back if it throws or answers 4xx/5xx.
  app.post('/transfers', {
    config: { db: { transaction: true } },
    schema: {
      body: {
        type: 'object',
        required: ['from', 'to', 'amount_cents'],
        properties: { from: { type: 'integer' }, to: { type: 'integer' }, amount_cents: { type: 'integer', minimum: 1 } }
      }
    }
  }, async (request, reply) => {
    const { from, to, amount_cents: amount } = request.body
    if (from === to) return reply.code(400).send({ error: 'from and to are the same account' })
    // Lock both rows in id order, so two opposite transfers can't deadlock.
    const { rows } = await request.db.query(
      'SELECT id, balance_cents::int FROM accounts WHERE id = ANY($1::int[]) ORDER BY id FOR UPDATE', [[from, to]])
    if (rows.length !== 2) return reply.code(404).send({ error: 'no such account' })
    const source = rows.find((r) => r.id === from)
    if (source.balance_cents < amount) return reply.code(422).send({ error: 'insufficient funds' })
    await request.db.query('UPDATE accounts SET balance_cents = balance_cents - $2 WHERE id = $1', [from, amount])
    await request.db.query('UPDATE accounts SET balance_cents = balance_cents + $2 WHERE id = $1', [to, amount])
    const transfer = await request.db.query(
      'INSERT INTO transfers (from_id, to_id, amount_cents) VALUES ($1, $2, $3) RETURNING id', [from, to, amount])
    return reply.code(201).send({ id: transfer.rows[0].id, from, to, amount_cents: amount })
  })

  // CSV export and import, streamed through the request's own connection with COPY: rows flow with
  // backpressure, never all in memory. Fastify's handlerTimeout also covers the time a streamed
  // response takes to send, so these routes get a longer one than the app's.
  app.get('/accounts.csv', { handlerTimeout: 600_000 }, async (request, reply) => {
    const csv = request.db.query(copyTo('COPY (SELECT id, name, balance_cents FROM accounts ORDER BY id) TO STDOUT (FORMAT csv, HEADER)'))
    return reply.type('text/csv').send(csv)
  })

  // The request body goes to COPY as it arrives. One transaction: a bad line (a duplicate name, a
  // negative balance) imports nothing.
  app.addContentTypeParser('text/csv', (request, body, done) => done(null, body))
  app.post('/accounts.csv', { config: { db: { transaction: true } }, handlerTimeout: 600_000 }, async (request, reply) => {
    const copy = request.db.query(copyFrom('COPY accounts (name, balance_cents) FROM STDIN (FORMAT csv, HEADER)'))
    try {
      await pipeline(request.body, copy)
    } catch (err) {
      if (err.code === '23505') return reply.code(409).send({ error: 'a name is taken', detail: err.detail })
      if (err.code?.startsWith('22') || err.code === '23514') return reply.code(400).send({ error: 'bad CSV', detail: err.message })
      throw err
    }
    return reply.code(201).send({ imported: copy.rowCount })
  })
}
