// One benchmarked app in its own process, so its CPU time and memory are its own.
// Parent → child IPC: 'measure' starts a window; 'report' ends it and answers with the figures.
import { readFileSync } from 'node:fs'
import { streamVariants } from './stream-variants.js'
import { variants } from './variants.js'

// CPU ticks (user + system) of the main thread, from /proc (Linux; elsewhere null). Together with
// process.cpuUsage() (all threads) it splits the app's CPU into JavaScript on the main thread and
// V8's helper threads (garbage collection, optimizing compiler).
function mainThreadMicros () {
  try {
    const fields = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8').split(') ')[1].split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 10_000
  } catch {
    return null
  }
}

const name = process.argv[2]
const variant = variants[name] ?? streamVariants[name]
if (!variant) throw new Error(`unknown variant ${name}`)

const app = await variant.build(process.env.DATABASE_URL)
await app.listen({ port: 0, host: '127.0.0.1' })

let cpuStart = null
let mainStart = null
let peakRss = 0
let sampler = null

process.on('message', async (msg) => {
  if (msg === 'measure') {
    peakRss = process.memoryUsage.rss()
    sampler = setInterval(() => { peakRss = Math.max(peakRss, process.memoryUsage.rss()) }, 50)
    cpuStart = process.cpuUsage()
    mainStart = mainThreadMicros()
    process.send({ type: 'measuring' })
  } else if (msg === 'report') {
    const cpu = process.cpuUsage(cpuStart)
    const mainEnd = mainThreadMicros()
    clearInterval(sampler)
    peakRss = Math.max(peakRss, process.memoryUsage.rss())
    process.send({ type: 'report', cpuMicros: cpu.user + cpu.system, mainMicros: mainEnd === null || mainStart === null ? null : mainEnd - mainStart, peakRss })
  } else if (msg === 'close') {
    // A leaked client makes pool.end() wait forever: don't let that hold the benchmark.
    setTimeout(() => process.exit(0), 2000).unref()
    await app.close()
    process.exit(0)
  }
})
process.send({ type: 'ready', port: app.server.address().port })
