/** The statement's first word, upper-cased: its operation name where pg gave no command tag (a stream, an error). */
export function operationOf (text: string): string {
  const match = /^\s*([A-Za-z]+)/.exec(text)
  return match === null ? 'UNKNOWN' : match[1].toUpperCase()
}
