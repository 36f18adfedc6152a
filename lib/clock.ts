import { performance } from 'node:perf_hooks'

/**
 * Milliseconds on a monotonic clock (`performance.now()`), for waits, holds and statement times.
 * `performance` is imported, not read from the global: Node defines `globalThis.performance` as a
 * lazy getter, and each read went through it (callgrind counted about a thousand instructions per
 * request on the observed path from the global lookups alone).
 */
export function now (): number {
  return performance.now()
}
