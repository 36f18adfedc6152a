// The one error every failure of the embedded server becomes: a paragraph a person can act on
// (what failed, why, what to do), because it is printed as-is by `npm start` and `npm test`.

const OWN_SERVER = 'Or set DATABASE_URL to a PostgreSQL server of your own ' +
  '(postgres://user:password@host:5432/database) and run the command again: it is then used instead.'

export class EmbeddedPostgresError extends Error {
  /**
   * @param {string} what what failed and why, as one or more sentences
   * @param {string} todo what to do about it, as one or more sentences ('' when only DATABASE_URL helps)
   * @param {unknown} [cause]
   */
  constructor (what, todo, cause) {
    super(['Could not start the embedded PostgreSQL:', what, todo, OWN_SERVER].filter(Boolean).join(' '), { cause })
    this.name = 'EmbeddedPostgresError'
  }
}

/** The last lines of a process's output, on one line, for a message that must stay one paragraph. */
export function lastLines (text, count = 6) {
  const lines = text.split('\n').map((line) => line.trim()).filter(Boolean).slice(-count)
  return lines.length ? `"${lines.join(' / ')}"` : '(no output)'
}
