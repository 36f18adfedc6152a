// The median of a list of numbers (NaN for none): bench/run.js and bench/instructions.js report it.
export function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
