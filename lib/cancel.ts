import { connect, type Socket } from 'node:net'

/**
 * Ask the server to cancel what a connection is running, with the protocol's CancelRequest.
 *
 * pg's `query_timeout` and closing our socket only stop the client side: the backend keeps running
 * the statement until it next writes to the socket. A CancelRequest goes over a new short-lived
 * connection, carries the backend's process id and secret key, and needs no authentication.
 */

const CANCEL_REQUEST_CODE = 80877102
/** How long to wait for the server to close the cancel connection before closing it ourselves. */
const GIVE_UP_MS = 2000

/** The slice of pg's Client this needs: it records these from the server's BackendKeyData. */
export interface CancellableClient {
  processID: number | null
  secretKey: number | null
  host?: string
  port?: number
}

/**
 * Resolves once the server has closed the cancel connection (it has read the request), or after
 * `giveUpMs`, or on a connection error. Never rejects: a cancel is best effort.
 */
export function requestCancel (client: CancellableClient, giveUpMs = GIVE_UP_MS): Promise<void> {
  const { processID, secretKey } = client
  const host = client.host ?? 'localhost'
  const port = client.port ?? 5432
  if (processID == null || secretKey == null) return Promise.resolve()

  const packet = Buffer.alloc(16)
  packet.writeInt32BE(16, 0)
  packet.writeInt32BE(CANCEL_REQUEST_CODE, 4)
  packet.writeInt32BE(processID, 8)
  packet.writeInt32BE(secretKey, 12)

  return new Promise((resolve) => {
    // A host that starts with '/' is libpq's spelling of a Unix socket directory.
    const socket: Socket = host.startsWith('/')
      ? connect(`${host}/.s.PGSQL.${port}`)
      : connect(port, host)
    const done = (): void => {
      clearTimeout(timer)
      socket.destroy()
      resolve()
    }
    // Best effort: the server answers by closing the socket; if it never does, stop waiting.
    const timer = setTimeout(done, giveUpMs)
    timer.unref()
    // Write, then leave the socket open until the server closes it: no half-close of our own.
    // PostgreSQL acts on the packet whatever we do next, but PgBouncer forwards it on a connection
    // of its own and drops a cancel whose sender has hung up meanwhile (the statement runs on), or
    // races with that hang-up and aborts ("disconnect_client(): bad client state"), taking every
    // client down with it. With PgBouncer 1.18 in front, `socket.end(packet)` lost the cancel or
    // crashed PgBouncer in 9 of 9 tries with a bare socket; writing, then waiting, cancelled in all.
    socket.once('connect', () => socket.write(packet))
    // Nothing is expected back, but bytes left unread would hold back the 'end' of the stream, and
    // the close would only be seen at the give-up: read and drop whatever comes.
    socket.resume()
    socket.once('close', done)
    socket.on('error', done)
  })
}
