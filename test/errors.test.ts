import t from 'tap'
import * as errors from '../lib/errors.js'

const expected: Array<[keyof typeof errors, number, unknown[], RegExp]> = [
  ['FST_REQUEST_DB_INVALID_OPTION', 500, ['DB_POOL_MAX', '"abc"', 'must be a whole number'], /^Invalid DB_POOL_MAX="abc": must be a whole number$/],
  ['FST_REQUEST_DB_CONNECT', 500, ['127.0.0.1:1/app', 'connect ECONNREFUSED'], /^Cannot connect to PostgreSQL at 127\.0\.0\.1:1\/app: connect ECONNREFUSED$/],
  ['FST_REQUEST_DB_ACQUIRE_TIMEOUT', 503, [250], /within 250ms/],
  ['FST_REQUEST_DB_OVERLOADED', 503, [12], /waiting .*\(12\)/],
  ['FST_REQUEST_DB_UNAVAILABLE', 503, ['connection refused'], /unavailable: connection refused$/],
  ['FST_REQUEST_DB_CONNECTION_LOST', 503, ['the session had changed (SET)'], /^The database connection of this request was lost: the session had changed \(SET\)$/],
  ['FST_REQUEST_DB_CLOSING', 503, [], /shutting down/],
  ['FST_REQUEST_DB_RELEASED', 500, [], /after the request ended/],
  ['FST_REQUEST_DB_TRANSACTION_STATEMENT', 500, ['COMMIT would end the route\'s transaction'], /^Transaction statement refused: COMMIT would end the route's transaction$/],
  ['FST_REQUEST_DB_COMMIT_FAILED', 500, ['deferred constraint'], /could not be committed: deferred constraint$/],
  ['FST_REQUEST_DB_CONTEXT_FAILED', 500, ['bad token'], /^The database context of this request could not be resolved: bad token$/],
  ['FST_REQUEST_DB_INVALID_CONTEXT', 500, ['role "x" is not in contextRoles'], /^Invalid database context: role "x" is not in contextRoles$/],
  ['FST_REQUEST_DB_CONTEXT_STATEMENT', 500, ['it would change the role'], /^Statement refused in a request with a database context: it would change the role$/],
  ['FST_REQUEST_DB_POOLER_REFUSED', 500, ['LISTEN: notifications never arrive'], /^Refused behind a transaction-mode pooler: LISTEN: notifications never arrive$/]
]

t.test('every error code: name, code, message, status, instanceof', async (t) => {
  const codes = Object.keys(errors).filter((k) => k.startsWith('FST_'))
  t.same(codes.sort(), expected.map(([code]) => code).sort(), 'each exported code is covered here')
  for (const [code, status, args, message] of expected) {
    const Ctor = errors[code] as unknown as new (...a: unknown[]) => Error & { code: string, statusCode?: number }
    const err = new Ctor(...args)
    t.equal(err.code, code, `${code}: code`)
    t.equal(err.name, 'FastifyError', `${code}: name`)
    t.equal(err.statusCode, status, `${code}: status`)
    t.match(err.message, message, `${code}: message`)
    t.ok(err instanceof Ctor, `${code}: instanceof its constructor`)
    t.ok(err instanceof Error, `${code}: instanceof Error`)
  }
})

t.test('the cause is kept', async (t) => {
  const cause = new Error('boom')
  const err = new errors.FST_REQUEST_DB_UNAVAILABLE('boom', { cause })
  t.equal(err.cause, cause)
  t.equal(err.message, 'The database is unavailable: boom')
})

t.test('retryable codes are the 503s', async (t) => {
  t.same([...errors.RETRYABLE_CODES].sort(), expected.filter(([, s]) => s === 503).map(([c]) => c).sort())
})
