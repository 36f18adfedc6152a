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
