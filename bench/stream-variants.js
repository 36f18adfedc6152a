// The streamed-export pair of the benchmark: the same NDJSON export of GET /export?rows=N, rows
// read through pg-query-stream with backpressure, on a client of a module-level pg.Pool (the
// anchor) and on request.db. Run by bench/streams.js, which measures rows per second.
import { Transform } from 'node:stream'
import Fastify from 'fastify'
import pg from 'pg'
import QueryStream from 'pg-query-stream'
import requestDb from 'fastify-request-db'

const MAX = 10
const ROWS = 'SELECT generate_series(1, $1::int) AS i, md5(random()::text) AS label'

/** Rows to NDJSON in chunks of about 64 KB, as a real export would write them. */
function ndjson () {
  let buffered = ''
  return new Transform({
    writableObjectMode: true,
    transform (row, _encoding, done) {
      buffered += JSON.stringify(row) + '\n'
      if (buffered.length < 65536) return done()
      const chunk = buffered
      buffered = ''
      done(null, chunk)
    },
    flush (done) {
      done(null, buffered === '' ? undefined : buffered)
    }
  })
}

function rowsOf (request) {
  return Number(request.query.rows) | 0
}

export const streamVariants = {
  'stream-raw-pool': {
    anchor: null,
    async build (url) {
      const pool = new pg.Pool({ connectionString: url, max: MAX })
      const app = Fastify({ logger: false })
      app.addHook('onClose', () => pool.end())
      app.get('/export', async (request, reply) => {
        const client = await pool.connect()
        const rows = client.query(new QueryStream(ROWS, [rowsOf(request)]))
        const release = () => client.release()
        rows.once('end', release).once('error', (err) => client.release(err))
        return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
      })
      return app
    }
  },
  'stream-request-db': {
    anchor: 'stream-raw-pool',
    async build (url) {
      const app = Fastify({ logger: false })
      await app.register(requestDb, { connectionString: url, max: MAX })
      app.get('/export', async (request, reply) => {
        const rows = request.db.query(new QueryStream(ROWS, [rowsOf(request)]))
        return reply.type('application/x-ndjson').send(rows.pipe(ndjson()))
      })
      return app
    }
  }
}
