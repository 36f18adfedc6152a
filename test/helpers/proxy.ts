// A TCP proxy on loopback in front of the test server, so a test can make "the database" vanish
// and come back (real refused connections and reset sockets) without stopping the shared server.
import { createServer, connect, type Server, type Socket } from 'node:net'
import type { AddressInfo } from 'node:net'

export interface Proxy {
  port: number
  /** Refuse new connections and cut the open ones. */
  cut (): Promise<void>
  /** Accept connections again, on the same port. */
  restore (): Promise<void>
  close (): Promise<void>
}

export async function startProxy (target: { host: string, port: number }): Promise<Proxy> {
  const sockets = new Set<Socket>()
  let server: Server
  const make = (): Server => createServer((client) => {
    const upstream = connect(target.port, target.host)
    sockets.add(client)
    sockets.add(upstream)
    const drop = (): void => {
      client.destroy()
      upstream.destroy()
      sockets.delete(client)
      sockets.delete(upstream)
    }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
    client.pipe(upstream).pipe(client)
  })
  const listen = (port: number): Promise<number> => new Promise((resolve, reject) => {
    server = make()
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => resolve((server.address() as AddressInfo).port))
  })
  const stop = (): Promise<void> => new Promise((resolve) => {
    for (const s of sockets) s.destroy()
    sockets.clear()
    server.close(() => resolve())
  })
  const port = await listen(0)
  let open = true
  return {
    port,
    async cut () {
      if (!open) return
      open = false
      await stop()
    },
    async restore () {
      if (open) return
      await listen(port)
      open = true
    },
    async close () {
      if (open) await stop()
      open = false
    }
  }
}
