// npm run bench:instructions: the budget pairs in instructions per request instead of req/s.
// Each variant's app runs under valgrind (callgrind), which counts the instructions the app process
// executes whatever else the machine is doing: on this shared 2-core machine a req/s ratio moves
// ±3 % from run to run (npm run bench:noise), while two processes of one app count within 1 %.
// - node --single-threaded: V8's helper threads (garbage collection, compiler) would otherwise spin
//   while valgrind runs one thread at a time, and their counts swing with it.
// - One continuous load per app: a restarted load makes Node's http internals deoptimize, and the
//   recompiling would land in the window. The window is `--requests` responses after `--warmup`.
// - V8's optimizing compiler is left out of the count (most of it: see COMPILER): it is warm-up
//   work (done on a helper thread in a real run), and whether a recompile lands in the window is
//   chance.
// - Counts repeat within an app; between two apps they also carry effects outside either's code
//   (V8's shared lookup caches, how the process was started): ±2 % was seen.
// Writes bench/instructions.md (a full run; --only and --baseline runs print their table). Options: --only a,b, --connections 10, --warmup 20000,
// --requests 5000, --reps 2, --keep DIR (keep each window's callgrind dump there, named after the
// variant, for `callgrind_annotate`), --baseline DIR (another checkout, built: each variant is also
// counted from that checkout's bench/app.js, right before this one's, so a before/after pair runs
// interleaved under the same conditions; the count moves a few % with how busy the machine is,
// because a busier app gets more requests per turn of the event loop).
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve as resolvePath } from 'node:path'
import { parseArgs } from 'node:util'
import autocannon from 'autocannon'
import { startApp } from './app-process.js'
import { median } from './median.js'
import { variants } from './variants.js'

const PAIRS = ['fastify-two-hooks', 'no-db', 'request-db-noop', 'raw-pool', 'request-db', 'fastify-postgres',
  'fastify-postgres-transact', 'request-db-transaction', 'raw-pool-3q', 'request-db-3q']
const { values: args } = parseArgs({
  options: {
    only: { type: 'string' },
    connections: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '20000' },
    requests: { type: 'string', default: '5000' },
    reps: { type: 'string', default: '2' },
    keep: { type: 'string' },
    baseline: { type: 'string' }
  }
})
if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set: run through `npm run bench:instructions`')
try {
  execFileSync('valgrind', ['--version'], { stdio: 'ignore' })
} catch {
  throw new Error('valgrind is not installed (Debian: apt-get install valgrind)')
}
const names = args.only ? args.only.split(',') : PAIRS
const BASELINE = ' (baseline)'
const labels = args.baseline === undefined ? names : names.flatMap((name) => [name + BASELINE, name])
const connections = Number(args.connections)
const warmup = Number(args.warmup)
const requests = Number(args.requests)
const dir = mkdtempSync(join(tmpdir(), 'request-db-callgrind-'))

// V8's optimizing compiler, by function name in callgrind's output: its passes, its zone allocator
// and the code around a compile job. (What it calls in libc, malloc and memcpy, stays counted.)
const COMPILER = /v8::internal::(?:compiler|maglev|turboshaft)::|v8::internal::(?:Zone|AccountingAllocator|OptimizedCompilationInfo|OptimizedCompilationJob|TurbofanCompilationJob)\b/

/** Instructions in the window (the second dump), all and without the optimizing compiler. */
function countWindow (pid) {
  const file = join(dir, `cg.${pid}.2`)
  let text
  try {
    text = readFileSync(file, 'utf8')
  } catch {
    throw new Error(`no callgrind dump for the window of process ${pid}`)
  }
  // Callgrind names a function once per dump file, then refers to it by number.
  const names = new Map()
  for (const m of text.matchAll(/^c?fn=\((\d+)\) (.*)$/gm)) names.set(m[1], m[2])
  let all = 0
  let compiler = 0
  let inCompiler = false
  let afterCalls = false
  for (const line of text.split('\n')) {
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

async function measure (label) {
  const name = label.replace(BASELINE, '')
  const appFile = label.endsWith(BASELINE) ? join(resolvePath(args.baseline), 'bench', 'app.js') : undefined
  const app = await startApp(name, ['valgrind', '-q', '--tool=callgrind', `--callgrind-out-file=${join(dir, 'cg.%p')}`,
    '--dump-instr=no', process.execPath, '--single-threaded'], appFile)
  const pid = String(app.child.pid)
  const dump = () => execFileSync('callgrind_control', ['-d', pid], { stdio: 'ignore' })
  let seen = 0
  try {
    // A dump blocks this process, and so autocannon: no request is sent while it runs, and the
    // count between the two dumps is off by at most the requests in flight (one per connection).
    await new Promise((resolve, reject) => {
      const run = autocannon({ url: `http://127.0.0.1:${app.port}/q?n=7`, connections, amount: warmup + requests + 2 * connections, timeout: 60 },
        (err, result) => {
          if (err) reject(err)
          // A request that failed still ran in the window: its instructions would count for nothing.
          else if (result.errors + result.timeouts + result.non2xx > 0) reject(new Error(`${name}: ${result.errors} errors, ${result.timeouts} timeouts, ${result.non2xx} non-2xx answers`))
          else resolve(result)
        })
      run.on('response', () => {
        seen++
        if (seen !== warmup && seen !== warmup + requests) return
        try {
          dump()
        } catch (err) {
          run.stop()
          reject(err)
        }
      })
    })
  } finally {
    // The dumps are written: nothing to wait for.
    const exited = new Promise((resolve) => app.child.once('exit', resolve))
    app.child.kill('SIGKILL')
    await exited
  }
  const counts = countWindow(pid)
  if (args.keep !== undefined) copyFileSync(join(dir, `cg.${pid}.2`), join(args.keep, `callgrind.${label.replace(BASELINE, '.baseline')}.${pid}`))
  for (const f of readdirSync(dir)) if (f.startsWith(`cg.${pid}`)) rmSync(join(dir, f))
  return { all: counts.all / requests, withoutCompiler: counts.withoutCompiler / requests }
}

const results = {}
const started = Date.now()
try {
  for (let rep = 1; rep <= Number(args.reps); rep++) {
    for (const name of labels) {
      const r = await measure(name)
      ;(results[name] ??= []).push(r)
      // Much compiling in the window means the app was still warming up.
      const warming = r.all > 1.05 * r.withoutCompiler ? ' — still compiling: raise --warmup' : ''
      process.stderr.write(`rep ${rep} ${name.padEnd(26)} ${(r.withoutCompiler / 1000).toFixed(2)} k instructions/request (${(r.all / 1000).toFixed(2)} k with the compiler)${warming}\n`)
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
}

const k = (x) => (x / 1000).toFixed(2)
let md = `# Instructions per request\n\n${new Date().toISOString().slice(0, 10)} · Node ${process.version} · valgrind callgrind, node --single-threaded · ` +
  `${connections} connections · ${requests} requests counted after ${warmup}, ${args.reps} app processes per variant\n\n` +
  '| variant | k instructions/request (each process) | median | anchor | anchor ÷ variant |\n|---|---|---:|---|---:|\n'
for (const label of labels) {
  const counts = results[label].map((r) => r.withoutCompiler)
  const anchor = variants[label.replace(BASELINE, '')].anchor
  const anchorLabel = anchor && label.endsWith(BASELINE) ? anchor + BASELINE : anchor
  const vs = anchor && results[anchorLabel] ? median(results[anchorLabel].map((r) => r.withoutCompiler)) / median(counts) : NaN
  md += `| ${label} | ${counts.map(k).join(', ')} | ${k(median(counts))} | ${anchor ?? '–'} | ${Number.isFinite(vs) ? vs.toFixed(4) : '–'} |\n`
}
if (args.baseline !== undefined) {
  md += `\nAgainst the baseline (${args.baseline}), median to median:\n\n`
  for (const name of names) {
    const before = median(results[name + BASELINE].map((r) => r.withoutCompiler))
    const after = median(results[name].map((r) => r.withoutCompiler))
    md += `- ${name}: ${k(before)} k → ${k(after)} k (${after >= before ? '+' : ''}${((after / before - 1) * 100).toFixed(2)} %)\n`
  }
}
md += '\n"anchor ÷ variant" is the throughput ratio the app would reach if its own CPU were all that limited it: ' +
  'compare it with the budget lines of `npm run bench`.\n' +
  `\nTotal time: ${((Date.now() - started) / 1000).toFixed(0)} s. Command: \`npm run bench:instructions\`${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}.\n`
if (args.only === undefined && args.baseline === undefined) writeFileSync(new URL('./instructions.md', import.meta.url), md)
console.log(md)
