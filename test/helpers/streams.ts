// Streaming helpers for the tests: rows to NDJSON, and HTTP clients that time a streamed body or
// walk away from it half-way.
import { request as httpRequest } from 'node:http'
import { Transform } from 'node:stream'

/** Rows (object mode) to NDJSON text, in chunks of about 64 KB rather than a write per row. */
export function ndjson (): Transform {
  let buffered = ''
  return new Transform({
    writableObjectMode: true,
    transform (row, _encoding, done) {
      buffered += JSON.stringify(row) + '\n'
      if (buffered.length < 65536) {
        done()
        return
      }
      const chunk = buffered
      buffered = ''
      done(null, chunk)
    },
    flush (done) {
      done(null, buffered === '' ? undefined : buffered)
    }
  })
}

export interface TimedBody {
  status: number
  body: string
  bytes: number
  firstByteMs: number
  totalMs: number
  /** The body ended as HTTP says it should (the chunked terminator arrived). */
  complete: boolean
}

/** GET (or a POST of `body`) read to its end, timing the first byte and the last. */
export function timedRequest (port: number, path: string, options: { method?: string, body?: string, keep?: boolean, headers?: Record<string, string> } = {}): Promise<TimedBody> {
  const started = performance.now()
  return new Promise((resolve, reject) => {
    const req = httpRequest({ port, host: '127.0.0.1', path, method: options.method ?? 'GET', agent: false, headers: options.headers }, (res) => {
      let firstByteMs = -1
      let bytes = 0
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => {
        if (firstByteMs < 0) firstByteMs = performance.now() - started
        bytes += c.length
        if (options.keep !== false) chunks.push(c)
      })
      const done = (): void => resolve({
        status: res.statusCode ?? 0,
        body: Buffer.concat(chunks).toString(),
        bytes,
        firstByteMs: Math.round(firstByteMs),
        totalMs: Math.round(performance.now() - started),
        complete: res.complete
      })
      res.on('end', done)
      res.on('error', done)
      res.on('aborted', done)
    })
    req.on('error', reject)
    req.end(options.body)
  })
}

/** GET, read until `bytes` have arrived, then hang up. Resolves with the status and first line. */
export function readThenHangUp (port: number, path: string, bytes: number): Promise<{ status: number, firstLine: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ port, host: '127.0.0.1', path, agent: false }, (res) => {
      let seen = 0
      let first = ''
      res.on('data', (c: Buffer) => {
        if (seen === 0) first = c.toString().split('\n')[0]
        seen += c.length
        if (seen >= bytes) {
          req.destroy()
          resolve({ status: res.statusCode ?? 0, firstLine: first })
        }
      })
      res.on('end', () => reject(new Error(`the body ended after ${seen} bytes, before the hang-up`)))
    })
    req.on('error', () => {})
    req.end()
  })
}

/** POST `first` of a body whose length says more is coming, then hang up. */
export function uploadThenHangUp (port: number, path: string, first: string, contentType: string): Promise<void> {
  return new Promise((resolve) => {
    const req = httpRequest({
      port,
      host: '127.0.0.1',
      path,
      method: 'POST',
      agent: false,
      headers: { 'content-type': contentType, 'content-length': String(first.length * 10) }
    })
    req.on('error', () => {})
    req.write(first, () => setTimeout(() => {
      req.destroy()
      resolve()
    }, 200))
  })
}
