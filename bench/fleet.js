// App instances in their own processes (bench/scaling-app.js), and load spread over them, for
// bench/scaling.js and bench/topology.js.
import autocannon from 'autocannon'
import { fork } from 'node:child_process'

/** Start `count` instances with `env` added to the environment; resolves with their ports. */
export async function startFleet (count, env) {
  const apps = await Promise.all(Array.from({ length: count }, () => new Promise((resolve, reject) => {
    const child = fork(new URL('./scaling-app.js', import.meta.url), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env, ...env } })
    child.once('message', (msg) => resolve({ child, port: msg.port }))
    child.once('exit', (code) => reject(new Error(`an app instance exited (${code}) before it was ready`)))
  })))
  return {
    apps,
    async stop () {
      await Promise.all(apps.map(({ child }) => new Promise((resolve) => {
        child.once('exit', resolve)
        child.send('close')
      })))
    }
  }
}

/**
 * `connections` spread evenly over the instances (each gets at least one), for `seconds`, on
 * `path`. Returns req/s (2xx), non-2xx and errors per second, and p50/p99 of all responses.
 */
export async function load (fleet, { path, connections, seconds }) {
  const each = Math.max(1, Math.round(connections / fleet.apps.length))
  const results = await Promise.all(fleet.apps.map(({ port }) => autocannon({
    url: `http://127.0.0.1:${port}${path}`, connections: each, duration: seconds
  })))
  const ok = results.reduce((n, r) => n + r['2xx'], 0)
  const bad = results.reduce((n, r) => n + r.non2xx, 0)
  const errors = results.reduce((n, r) => n + r.errors + r.timeouts, 0)
  // Weighted by each instance's responses: an approximation of the fleet's own percentiles.
  const total = results.reduce((n, r) => n + r.requests.total, 0) || 1
  const p50 = results.reduce((n, r) => n + r.latency.p50 * r.requests.total, 0) / total
  const p99 = Math.max(...results.map((r) => r.latency.p99))
  return { rps: ok / seconds, badPerSecond: bad / seconds, errorsPerSecond: errors / seconds, p50, p99, connections: each * fleet.apps.length }
}
