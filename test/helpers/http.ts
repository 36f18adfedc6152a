// Plain node:http clients for the tests that need real sockets (app.listen), not inject.
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'

export async function listen (app: FastifyInstance): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as AddressInfo).port
}

/** GET that the client abandons after `ms` by destroying its socket. */
export function getThenHangUp (port: number, path: string, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const req = httpRequest({ port, host: '127.0.0.1', path, agent: false })
    const timer = setTimeout(() => { req.destroy(); resolve() }, ms)
    const done = (): void => { clearTimeout(timer); resolve() }
    req.on('error', done)
    req.on('response', done)
    req.end()
  })
}

export function get (port: number, path: string): Promise<{ status: number, body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ port, host: '127.0.0.1', path, agent: false }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

