// requestCancel against a stand-in server that records what it is sent and when the sender hangs
// up: over TCP and over a Unix socket, a server that never answers, and none at all. The real
// thing, through PgBouncer and straight to PostgreSQL: cancel-pgbouncer.test.ts, cancel-direct.test.ts.
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { requestCancel } from '../lib/cancel.js'

interface Seen {
  packet: Buffer
  /** The sender half-closed (or closed) its side before the server closed the connection. */
  senderHungUpFirst: boolean
  closedByServerAt: number
}

/**
 * Reads the 16-byte CancelRequest, then, like PgBouncer forwarding it, takes `holdMs` before it
 * closes the connection (never, if `holdMs` is null), noting whether the sender hung up meanwhile.
 */
function standIn (holdMs: number | null): { server: Server, seen: Promise<Seen>, ended: Promise<void> } {
  let seen!: (s: Seen) => void
  let ended!: () => void
  const seenPromise = new Promise<Seen>((resolve) => { seen = resolve })
  const endedPromise = new Promise<void>((resolve) => { ended = resolve })
  const server = createServer((socket: Socket) => {
    let data = Buffer.alloc(0)
    let senderHungUp = false
    socket.on('end', () => { senderHungUp = true })
    socket.on('close', () => { senderHungUp = true; ended() })
    socket.on('error', () => {})
    socket.on('data', (chunk) => {
      data = Buffer.concat([data, chunk])
      if (data.length < 16 || holdMs === null) return
      setTimeout(() => {
        const senderHungUpFirst = senderHungUp
        socket.end()
        seen({ packet: data, senderHungUpFirst, closedByServerAt: Date.now() })
      }, holdMs)
    })
  })
  return { server, seen: seenPromise, ended: endedPromise }
}

function listening (server: Server, ...where: [number, string] | [string]): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(...(where as [number, string]), () => resolve())
  })
}

function close (server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()))
}

function checkPacket (t: { equal: (a: unknown, b: unknown, m: string) => void, same: (a: unknown, b: unknown, m: string) => void }, packet: Buffer): void {
  t.equal(packet.length, 16, 'one 16-byte message')
  t.same([packet.readInt32BE(0), packet.readInt32BE(4), packet.readInt32BE(8), packet.readInt32BE(12)],
    [16, 80877102, 4711, -123456], 'length, CancelRequest code, process id, secret key')
}

t.test('regression (issue 19): the cancel connection is left open until the server closes it, over TCP', async (t) => {
  const { server, seen } = standIn(100)
  await listening(server, 0, '127.0.0.1')
  t.teardown(() => close(server))
  const port = (server.address() as { port: number }).port
  await requestCancel({ processID: 4711, secretKey: -123456, host: '127.0.0.1', port })
  const resolvedAt = Date.now()
  const s = await seen
  checkPacket(t, s.packet)
  t.notOk(s.senderHungUpFirst, 'no half-close after the packet: PgBouncer drops such a cancel, or crashes')
  t.ok(resolvedAt >= s.closedByServerAt, 'resolved once the server had closed the connection')
})

t.test('regression (issue 19): the same over a Unix socket (host starting with "/")', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'request-db-cancel-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const { server, seen } = standIn(100)
  await listening(server, join(dir, '.s.PGSQL.5999'))
  t.teardown(() => close(server))
  await requestCancel({ processID: 4711, secretKey: -123456, host: dir, port: 5999 })
  const resolvedAt = Date.now()
  const s = await seen
  checkPacket(t, s.packet)
  t.notOk(s.senderHungUpFirst, 'no half-close after the packet')
  t.ok(resolvedAt >= s.closedByServerAt, 'resolved once the server had closed the connection')
})

t.test('a server that never closes the cancel connection: given up after the bound, the connection closed', async (t) => {
  const { server, ended } = standIn(null)
  await listening(server, 0, '127.0.0.1')
  t.teardown(() => close(server))
  const port = (server.address() as { port: number }).port
  const started = Date.now()
  await requestCancel({ processID: 4711, secretKey: -123456, host: '127.0.0.1', port }, 150)
  const waited = Date.now() - started
  t.ok(waited >= 140 && waited < 2000, `resolved after the 150 ms bound (${waited} ms)`)
  await ended
  t.pass('the server saw the connection closed')
})

t.test('nothing listening: resolves, never rejects', async (t) => {
  const server = createServer()
  await listening(server, 0, '127.0.0.1')
  const port = (server.address() as { port: number }).port
  await close(server)
  await t.resolves(requestCancel({ processID: 1, secretKey: 2, host: '127.0.0.1', port }))
})

t.test('no BackendKeyData (processID or secretKey null): nothing is sent', async (t) => {
  const server = createServer(() => t.fail('no connection expected'))
  await listening(server, 0, '127.0.0.1')
  t.teardown(() => close(server))
  const port = (server.address() as { port: number }).port
  await requestCancel({ processID: null, secretKey: 2, host: '127.0.0.1', port })
  await requestCancel({ processID: 1, secretKey: null, host: '127.0.0.1', port })
  await new Promise((resolve) => setTimeout(resolve, 50))
  t.pass('resolved without connecting')
})
