/**
 * Passwords must never reach an error message or a log line. Two nets: the userinfo part of any URL
 * is masked by shape, and the known secrets (from DATABASE_URL and PGPASSWORD) are masked by value,
 * which also catches a password that a driver error happened to quote on its own.
 */

const MASK = '****'
const URL_PASSWORD = /(\b[a-z][a-z0-9+.-]*:\/\/[^:/?#@\s]*:)[^@/\s]*@/gi

/** Mask the password of every URL in `text`. */
export function redactUrl (text: string): string {
  return text.replace(URL_PASSWORD, `$1${MASK}@`)
}

/** Returns a function that masks URL passwords and every given secret in a string. */
export function createRedactor (secrets: readonly string[]): (text: string) => string {
  // Longest first, so a secret that contains another is masked whole.
  const values = [...new Set(secrets.filter((s) => s.length > 0))].sort((a, b) => b.length - a.length)
  return (text) => {
    let out = redactUrl(text)
    for (const secret of values) out = out.split(secret).join(MASK)
    return out
  }
}

/** An error as it may be logged under pino's `err` key: name, redacted message and code. */
export interface LoggableError {
  name: string
  message: string
  code?: string
}

/**
 * `err` as it may be logged: its message redacted, no stack or driver internals (a pg error's
 * fields can quote the statement). Made without a prototype: pino's err serializer takes `type`
 * from an error's constructor, which for a plain object says `Object`; with none it takes `name`.
 */
export function loggableError (err: unknown, redact: (text: string) => string): LoggableError {
  const e = err as { name?: unknown, message?: unknown, code?: unknown }
  const loggable = Object.create(null) as LoggableError
  loggable.name = typeof e?.name === 'string' ? e.name : 'Error'
  if (typeof e?.code === 'string') loggable.code = e.code
  // Node's connection errors can come with an empty message (an AggregateError of ECONNREFUSED).
  const message = typeof e?.message === 'string' ? e.message : String(err)
  loggable.message = redact(message !== '' ? message : loggable.code ?? loggable.name)
  return loggable
}
