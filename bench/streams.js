// The streamed-export line of `npm run bench`: rows per second of an NDJSON export through
// pg-query-stream on request.db against the same route on a module-level pg.Pool client,
// interleaved (each round runs both, every other round in reverse order), a fresh app process per
// run. A run is a warm-up export, then `exports` sequential exports of `rows` rows, read to the
// end by a plain HTTP client in this process.
import { request as httpRequest } from 'node:http'
import { startApp, stopApp } from './app-process.js'
import { median } from './median.js'
import { streamVariants } from './stream-variants.js'

function exportOnce (port, rows) {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ port, host: '127.0.0.1', path: `/export?rows=${rows}`, agent: false }, (res) => {
      let lines = 0
      res.on('data', (chunk) => {
        for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) lines++
      })
      res.on('end', () => (res.statusCode === 200 && lines === rows ? resolve() : reject(new Error(`status ${res.statusCode}, ${lines} of ${rows} rows`))))
    })
    req.on('error', reject)
    req.end()
  })
}

/** @returns {Promise<Record<string, Array<{ rowsPerSecond: number, cpuPerRow: number, peakRss: number }>>>} */
export async function measureStreams ({ rounds, rows = 200_000, exports = 3, log = () => {} }) {
  const names = Object.keys(streamVariants)
  const results = {}
  for (let round = 1; round <= rounds; round++) {
    for (const name of round % 2 === 1 ? names : [...names].reverse()) {
      const app = await startApp(name)
      await exportOnce(app.port, rows / 4)
      app.child.send('measure')
      await app.next()
      const started = performance.now()
      for (let i = 0; i < exports; i++) await exportOnce(app.port, rows)
      const seconds = (performance.now() - started) / 1000
      app.child.send('report')
      const report = await app.next()
      await stopApp(app)
      const row = { rowsPerSecond: rows * exports / seconds, cpuPerRow: report.cpuMicros / (rows * exports), peakRss: report.peakRss }
      ;(results[name] ??= []).push(row)
      log(`round ${round} ${name.padEnd(26)} ${row.rowsPerSecond.toFixed(0).padStart(8)} rows/s  ${row.cpuPerRow.toFixed(2)} µs/row`)
    }
  }
  return results
}

/** Median of the per-round ratios of `name` to its anchor. */
export function streamRatio (results, name) {
  const anchor = streamVariants[name].anchor
  return median(results[name].map((row, i) => row.rowsPerSecond / results[anchor][i].rowsPerSecond))
}
