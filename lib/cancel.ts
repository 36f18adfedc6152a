import { connect, type Socket } from 'node:net'

/**
 * Ask the server to cancel what a connection is running, with the protocol's CancelRequest.
 *
 * pg's `query_timeout` and closing our socket only stop the client side: the backend keeps running
 * the statement until it next writes to the socket. A CancelRequest goes over a new short-lived
 * connection, carries the backend's process id and secret key, and needs no authentication.
 */

const CANCEL_REQUEST_CODE = 80877102
const GIVE_UP_MS = 2000

/** The slice of pg's Client this needs: it records these from the server's BackendKeyData. */
export interface CancellableClient {
  processID: number | null
  secretKey: number | null
  host?: string
  port?: number
}

export function requestCancel (client: CancellableClient): Promise<void> {
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
    const timer = setTimeout(done, GIVE_UP_MS)
    timer.unref()
    socket.once('connect', () => socket.end(packet))
    socket.once('close', done)
    socket.once('error', done)
  })
}
