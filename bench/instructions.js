// npm run bench:instructions: the budget pairs in instructions per request instead of req/s.
// Each variant's app runs under valgrind (callgrind), which counts the instructions the app process
// executes whatever else the machine is doing: on this shared 2-core machine a req/s ratio moves
// ±3 % from run to run (npm run bench:noise), while two processes of one app count within 1 %.
// - node --single-threaded: V8's helper threads (garbage collection, compiler) would otherwise spin
//   while valgrind runs one thread at a time, and their counts swing with it.
// - One continuous load per app: a restarted load makes Node's http internals deoptimize, and the
//   recompiling would land in the window. The window is `--requests` responses after `--warmup`.
// - V8's optimizing compiler is left out of the count: it is warm-up work (done on a helper thread
//   in a real run), and whether a recompile lands in the window is chance.
// Writes bench/instructions.md. Options: --only a,b, --connections 10, --warmup 20000,
// --requests 5000, --reps 2
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import autocannon from 'autocannon'
import { startApp } from './app-process.js'
import { variants } from './variants.js'

const PAIRS = ['fastify-two-hooks', 'no-db', 'request-db-noop', 'raw-pool', 'request-db', 'fastify-postgres',
  'fastify-postgres-transact', 'request-db-transaction', 'raw-pool-3q', 'request-db-3q']
const { values: args } = parseArgs({
  options: {
    only: { type: 'string' },
    connections: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '20000' },
    requests: { type: 'string', default: '5000' },
    reps: { type: 'string', default: '2' }
  }
})
if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set: run through `npm run bench:instructions`')
try {
  execFileSync('valgrind', ['--version'], { stdio: 'ignore' })
} catch {
  throw new Error('valgrind is not installed (Debian: apt-get install valgrind)')
}
const names = args.only ? args.only.split(',') : PAIRS
const connections = Number(args.connections)
const warmup = Number(args.warmup)
const requests = Number(args.requests)
const dir = mkdtempSync(join(tmpdir(), 'request-db-callgrind-'))

// V8's optimizing compiler, by function name in callgrind's output.
const COMPILER = /v8::internal::(?:compiler|maglev|turboshaft)::/

/**
 * Instructions in the window (the second dump), all and without the optimizing compiler. Callgrind
 * names each function once per process and refers to it by number afterwards, so the names are
 * read from both dumps.
 */
function countWindow (pid) {
  const files = readdirSync(dir).filter((f) => f.startsWith(`cg.${pid}.`)).sort()
  const window = files.find((f) => f.endsWith('.2'))
  if (window === undefined) throw new Error(`no callgrind dump for the window of process ${pid}`)
  const names = new Map()
  for (const f of files) {
    for (const m of readFileSync(join(dir, f), 'utf8').matchAll(/^c?fn=\((\d+)\) (.*)$/gm)) names.set(m[1], m[2])
  }
  let all = 0
  let compiler = 0
  let inCompiler = false
  let afterCalls = false
  for (const line of readFileSync(join(dir, window), 'utf8').split('\n')) {
    const fn = /^fn=\((\d+)\)/.exec(line)
    if (fn !== null) {
      inCompiler = COMPILER.test(names.get(fn[1]) ?? '')
    } else if (line.startsWith('calls=')) {
      // The next cost line is the call's inclusive cost, counted where it was spent.
      afterCalls = true
    } else if (/^[0-9+*-]/.test(line)) {
      if (afterCalls) {
        afterCalls = false
        continue
      }
      const cost = Number(line.split(' ')[1] ?? 0)
      all += cost
      if (inCompiler) compiler += cost
    }
  }
  return { all, withoutCompiler: all - compiler }
}

async function measure (name) {
  const app = await startApp(name, ['valgrind', '-q', '--tool=callgrind', `--callgrind-out-file=${join(dir, 'cg.%p')}`,
    '--dump-instr=no', process.execPath, '--single-threaded'])
  const pid = String(app.child.pid)
  const dump = () => execFileSync('callgrind_control', ['-d', pid], { stdio: 'ignore' })
  let seen = 0
  try {
    // A dump stops this process, and so the load, while it runs: the count between the two dumps
    // is exact to within the requests in flight (at most one per connection).
    await new Promise((resolve, reject) => {
      const run = autocannon({ url: `http://127.0.0.1:${app.port}/q?n=7`, connections, amount: warmup + requests + 2 * connections, timeout: 60 },
        (err, result) => err ? reject(err) : resolve(result))
      run.on('response', (client, statusCode) => {
        if (statusCode !== 200) reject(new Error(`${name} answered ${statusCode}`))
        seen++
        if (seen === warmup || seen === warmup + requests) dump()
      })
    })
  } finally {
    // The dumps are written: nothing to wait for.
    const exited = new Promise((resolve) => app.child.once('exit', resolve))
    app.child.kill('SIGKILL')
    await exited
  }
  const counts = countWindow(pid)
  return { all: counts.all / requests, withoutCompiler: counts.withoutCompiler / requests }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const results = {}
const started = Date.now()
try {
  for (let rep = 1; rep <= Number(args.reps); rep++) {
    for (const name of names) {
      const r = await measure(name)
      ;(results[name] ??= []).push(r)
      process.stderr.write(`rep ${rep} ${name.padEnd(26)} ${(r.withoutCompiler / 1000).toFixed(2)} k instructions/request (${(r.all / 1000).toFixed(2)} k with the compiler)\n`)
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
}

const k = (x) => (x / 1000).toFixed(2)
let md = `# Instructions per request\n\n${new Date().toISOString().slice(0, 10)} · Node ${process.version} · valgrind callgrind, node --single-threaded · ` +
  `${connections} connections · ${requests} requests counted after ${warmup}, ${args.reps} app processes per variant\n\n` +
  '| variant | k instructions/request (each process) | median | anchor | anchor ÷ variant |\n|---|---|---:|---|---:|\n'
for (const name of names) {
  const counts = results[name].map((r) => r.withoutCompiler)
  const anchor = variants[name].anchor
  const vs = anchor && results[anchor] ? median(results[anchor].map((r) => r.withoutCompiler)) / median(counts) : NaN
  md += `| ${name} | ${counts.map(k).join(', ')} | ${k(median(counts))} | ${anchor ?? '–'} | ${Number.isFinite(vs) ? vs.toFixed(4) : '–'} |\n`
}
md += '\n"anchor ÷ variant" is the throughput ratio the app would reach if its own CPU were all that limited it: ' +
  'compare it with the budget lines of `npm run bench`.\n' +
  `\nTotal time: ${((Date.now() - started) / 1000).toFixed(0)} s. Command: \`npm run bench:instructions\`${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}.\n`
writeFileSync(new URL('./instructions.md', import.meta.url), md)
console.log(md)
