// A pino destination that keeps every line, for tests that read what was logged.
import { Writable } from 'node:stream'

export interface LogLine {
  level: number
  msg: string
  reqId?: string
  [key: string]: unknown
}

export interface CapturedLog {
  stream: Writable
  /** Every line so far, parsed. */
  lines (): LogLine[]
  /** Every line so far, as written. */
  text (): string
}

export function captureLog (): CapturedLog {
  const chunks: string[] = []
  const stream = new Writable({
    write (chunk, _encoding, done) {
      chunks.push(String(chunk))
      done()
    }
  })
  const text = (): string => chunks.join('')
  return {
    stream,
    text,
    lines: () => text().split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as LogLine)
  }
}
