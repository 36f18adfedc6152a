/**
 * BEGIN and a request's database context on the wire: one write, one round trip, and on a direct
 * connection both statements prepared once per connection, so the server neither parses nor plans
 * them again for every request.
 *
 * pg sends one statement at a time and waits for its ReadyForQuery before the next, so BEGIN and
 * the context's SELECT as two queries would be two round trips. This is one query to pg (a
 * "submittable", as pg-cursor is) that writes extended-protocol messages for both under one Sync:
 *
 *   first time on a connection:  Close Parse Bind Execute (BEGIN) · Close Parse Bind($1…$n) Execute · Sync
 *   after that:                  Bind Execute (BEGIN) · Bind($1…$n) Execute · Sync
 *   behind a transaction pooler: Parse Bind Execute (BEGIN) · Parse Bind($1…$n) Execute · Sync, all unnamed
 *
 * What preparing saves was measured (`npm run bench:server`, bench/README.md): the server spent
 * 85 µs of CPU per transaction with the context's statement unnamed against 49 µs with it
 * prepared, a plain route transaction 38 µs; under load, an unnamed BEGIN (parsed, its plan made
 * and dropped for every request) showed in the backends' profile, and preparing it too moved the
 * context route from 0.94 to 0.96 × a plain route transaction's req/s (medians). A pooler in
 * transaction mode hands the next transaction to another server connection, where a prepared
 * statement does not exist: there both stay unnamed.
 *
 * A prepared statement may vanish from outside a request (`DEALLOCATE ALL` or `DISCARD ALL` run
 * through `fastify.pg`, where the session-state check does not see it): its Bind fails with
 * SQLSTATE 26000, the connection's memory forgets this plugin's names, and `isStaleStatement` tells
 * the caller to roll back and send the batch again. A name sent the first time is closed before it
 * is parsed (Close of a missing statement is no error), so that Parse never meets one that exists.
 * Should the BEGIN's own Bind fail, no transaction is open: nothing else of the request is on the
 * wire behind the batch (a lease's statements wait for its answer: Session.opening), and the batch
 * is sent again before any of them runs.
 */
import type { QueryResult } from 'pg'

/** The slice of pg's Connection the batch is written to, and where its prepared names are kept. */
interface PgConnection {
  _send (buffer: Buffer): boolean
  stream?: { writable?: boolean }
  [kPrepared]?: Set<string>
}

/** The names this plugin prepared on a connection (its own, never pg's `parsedStatements`). */
// Symbol.for: the ESM and CommonJS builds, both loaded and sharing a pool, share the memory too.
const kPrepared = Symbol.for('fastify-request-db.prepared')

// The messages, as the protocol defines them (https://www.postgresql.org/docs/current/protocol-message-formats.html):
// a type byte, an Int32 length that counts itself, the body. Strings are NUL-terminated UTF-8.
function message (type: string, body: Buffer): Buffer {
  const head = Buffer.allocUnsafe(5)
  head.write(type, 0, 'latin1')
  head.writeInt32BE(body.length + 4, 1)
  return Buffer.concat([head, body])
}

function cString (text: string): Buffer {
  return Buffer.from(`${text}\0`, 'utf8')
}

const int16 = (n: number): Buffer => { const b = Buffer.allocUnsafe(2); b.writeInt16BE(n, 0); return b }
const int32 = (n: number): Buffer => { const b = Buffer.allocUnsafe(4); b.writeInt32BE(n, 0); return b }

// Parse: a statement (named, or the unnamed one ''), its text, no parameter types given (the
// server infers text from set_config's signature).
const parse = (name: string, text: string): Buffer => message('P', Buffer.concat([cString(name), cString(text), int16(0)]))
// Bind with no parameters: the unnamed portal to statement `name`, results in text format.
const bindNone = (name: string): Buffer => message('B', Buffer.concat([cString(''), cString(name), int16(0), int16(0), int16(0)]))
// Execute: the unnamed portal, all rows. Sync: end of the batch.
const EXECUTE = message('E', Buffer.concat([cString(''), int32(0)]))
const SYNC = message('S', Buffer.alloc(0))
// The unnamed statement's name in a Bind.
const UNNAMED = cString('')

// Close: statement `name` ('S'); no error when there is none.
const close = (name: string): Buffer => message('C', Buffer.concat([Buffer.from('S'), cString(name)]))

const BEGIN_NAME = 'fastify_request_db_begin'
const BEGIN_UNNAMED = Buffer.concat([parse('', 'BEGIN'), bindNone(''), EXECUTE])
const BEGIN_PREPARE = Buffer.concat([close(BEGIN_NAME), parse(BEGIN_NAME, 'BEGIN'), bindNone(BEGIN_NAME), EXECUTE])
const BEGIN_PREPARED = Buffer.concat([bindNone(BEGIN_NAME), EXECUTE])

/**
 * The statement that applies a context of one shape (how many settings, whether a role): the
 * text depends on nothing else, so there are a handful of them, built once.
 */
class ContextShape {
  /** `SELECT WHERE (pg_catalog.set_config($1, $2, true) || … || pg_catalog.set_config('role', $n, true)) IS NULL` */
  readonly text: string
  /** What observers of the statement (tracing, leak reports) see: both statements. */
  readonly shownText: string
  readonly name: string
  /** Close, then Parse: the first time on a connection. */
  readonly parseNamed: Buffer
  readonly parseUnnamed: Buffer
  /** The statement's name as a Bind message carries it. */
  readonly nameBytes: Buffer

  constructor (settings: number, hasRole: boolean) {
    // Qualified: a `set_config` of another schema earlier in search_path must not stand in for it.
    const calls: string[] = []
    for (let i = 0; i < settings; i++) calls.push(`pg_catalog.set_config($${2 * i + 1}, $${2 * i + 2}, true)`)
    if (hasRole) calls.push(`pg_catalog.set_config('role', $${2 * settings + 1}, true)`)
    // In a WHERE that is never true (set_config returns the value it set, never NULL): the calls
    // run once, and the answer has no row for the server to send and pg to parse.
    this.text = `SELECT WHERE (${calls.join(' || ')}) IS NULL`
    this.shownText = `BEGIN; ${this.text}`
    this.name = `fastify_request_db_context_${settings}${hasRole ? '_role' : ''}`
    this.parseNamed = Buffer.concat([close(this.name), parse(this.name, this.text)])
    this.parseUnnamed = parse('', this.text)
    this.nameBytes = cString(this.name)
  }
}

const shapes = new Map<number, ContextShape>()

/** The shape for `settings` settings and maybe a role (at least one of them). */
export function contextShape (settings: number, hasRole: boolean): ContextShape {
  const key = settings * 2 + (hasRole ? 1 : 0)
  let shape = shapes.get(key)
  if (shape === undefined) {
    shape = new ContextShape(settings, hasRole)
    shapes.set(key, shape)
  }
  return shape
}

export type { ContextShape }

const RESULT: QueryResult = Object.freeze({ command: 'BEGIN', rowCount: null, oid: 0, rows: [], fields: [] }) as unknown as QueryResult

/**
 * BEGIN with the context, as one query for pg: what pg's client calls on the query it is running.
 * Not a pg.Query (an EventEmitter with a result to build): the replies are not read, only whether
 * one was an error. Single use, as pg's queries are.
 */
export class BeginWithContext {
  readonly text: string
  /** Set by pg's client.query from its callback argument. */
  callback: ((err: Error | null, result?: QueryResult) => void) | undefined = undefined
  private readonly shape: ContextShape
  private readonly values: readonly string[]
  private readonly prepare: boolean
  private connection: PgConnection | null = null

  constructor (shape: ContextShape, values: readonly string[], prepare: boolean) {
    this.shape = shape
    this.values = values
    this.prepare = prepare
    this.text = shape.shownText
  }

  submit (connection: PgConnection): Error | null {
    this.connection = connection
    const shape = this.shape
    let batch: Buffer
    if (!this.prepare) {
      batch = this.batch(BEGIN_UNNAMED, shape.parseUnnamed, UNNAMED)
    } else {
      // Remembered as soon as sent, whatever the reply: an error after a Parse leaves its statement
      // there. (Should the Parse itself fail, the next Bind meets 26000 and the name is forgotten.)
      const prepared = connection[kPrepared] ??= new Set()
      let begin = BEGIN_PREPARED
      if (!prepared.has(BEGIN_NAME)) {
        begin = BEGIN_PREPARE
        prepared.add(BEGIN_NAME)
      }
      let contextParse: Buffer | null = null
      if (!prepared.has(shape.name)) {
        contextParse = shape.parseNamed
        prepared.add(shape.name)
      }
      batch = this.batch(begin, contextParse, shape.nameBytes)
    }
    const sent = connection._send(batch)
    // false is backpressure (the bytes are queued), or a stream that is no longer writable.
    return sent || connection.stream?.writable !== false ? null : new Error('Connection is not writable')
  }

  /**
   * The whole batch in one buffer, allocated once, the Bind written in place (the benchmark counted
   * the small buffers a Bind built from parts costs): BEGIN, the context's Parse if it needs one,
   * its Bind to `statement` (a name with its NUL, or just the NUL), Execute, Sync.
   */
  private batch (begin: Buffer, contextParse: Buffer | null, statement: Buffer): Buffer {
    const values = this.values
    // Bind: type, length, portal '\0', statement name, 0 format codes, n values, (length, bytes)…, 0 result formats.
    let bindLength = 4 + 1 + statement.length + 2 + 2 + 2
    for (const value of values) bindLength += 4 + Buffer.byteLength(value, 'utf8')
    const size = begin.length + (contextParse?.length ?? 0) + 1 + bindLength + EXECUTE.length + SYNC.length
    const buffer = Buffer.allocUnsafe(size)
    let at = begin.copy(buffer, 0)
    if (contextParse !== null) at += contextParse.copy(buffer, at)
    buffer[at++] = 0x42 // 'B'
    at = buffer.writeInt32BE(bindLength, at)
    buffer[at++] = 0
    at += statement.copy(buffer, at)
    at = buffer.writeInt16BE(0, at)
    at = buffer.writeInt16BE(values.length, at)
    for (const value of values) {
      const length = buffer.write(value, at + 4, 'utf8')
      at = buffer.writeInt32BE(length, at) + length
    }
    at = buffer.writeInt16BE(0, at)
    at += EXECUTE.copy(buffer, at)
    SYNC.copy(buffer, at)
    return buffer
  }

  handleReadyForQuery (): void {
    this.callback?.(null, RESULT)
  }

  handleError (err: Error): void {
    // An error before the Sync (a set_config's, a missing statement) arrives on its own; the
    // ReadyForQuery that follows is no longer this query's. A broken connection arrives here too.
    // A statement gone missing: which one the message names, but both are cheap to prepare again.
    if (this.prepare && (err as { code?: unknown }).code === MISSING) this.connection?.[kPrepared]?.clear()
    this.callback?.(err)
  }

  // The replies, unread: BEGIN's and the SELECT's CommandComplete.
  handleRowDescription (): void {}
  handleDataRow (): void {}
  handleCommandComplete (): void {}
  handleEmptyQuery (): void {}
  handlePortalSuspended (): void {}
  handleCopyInResponse (): void {}
  handleCopyData (): void {}
}


// invalid_sql_statement_name: Bind to a statement that is not there.
const MISSING = '26000'

/**
 * A context batch failed because this connection's memory of its prepared statements was wrong:
 * it is right now (forgotten: the batch prepares them again), and the same batch sent again succeeds.
 */
export function isStaleStatement (err: unknown): boolean {
  return (err as { code?: unknown } | null)?.code === MISSING
}
