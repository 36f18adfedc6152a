// Plain node:http clients for the tests that need real sockets (app.listen), not inject.
import { type IncomingHttpHeaders, request as httpRequest } from 'node:http'
import { type AddressInfo, connect, type Socket } from 'node:net'
import type { FastifyInstance } from 'fastify'

export async function listen (app: FastifyInstance): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as AddressInfo).port
}

/** A GET written on a bare socket, which stays open until the test destroys it (a hang-up). */
export function getOnOwnSocket (port: number, path: string): Socket {
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`)
  return socket
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

export interface Answer {
  status: number
  body: string
  headers: IncomingHttpHeaders
}

export function get (port: number, path: string): Promise<Answer> {
  return send(port, 'GET', path)
}

/** POST of a JSON body, read to the end. */
export function postJson (port: number, path: string, json: unknown): Promise<Answer> {
  return send(port, 'POST', path, JSON.stringify(json))
}

function send (port: number, method: string, path: string, body?: string): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { 'content-type': 'application/json' }
    const req = httpRequest({ port, host: '127.0.0.1', path, method, agent: false, headers }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c) => { text += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, headers: res.headers }))
    })
    req.on('error', reject)
    req.end(body)
  })
}
