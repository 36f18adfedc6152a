// The short soak: soak/run.js for 15 s on its own embedded server, every fault injected, every
// invariant checked by the script itself (it exits 1 if one fails).
import { spawnSync } from 'node:child_process'
import t from 'tap'

t.test('npm run soak, short: all invariants hold under faults', { timeout: 180_000 }, async (t) => {
  const env = { ...process.env }
  delete env.DATABASE_URL // its own server, so that it may restart it
  const run = spawnSync(process.execPath, ['soak/run.js', '--duration', '15', '--connections', '60'], {
    cwd: new URL('..', import.meta.url).pathname, env, encoding: 'utf8', timeout: 170_000
  })
  t.equal(run.status, 0, `soak exited 0\n${run.stdout}\n${run.stderr.slice(-3000)}`)
  t.match(run.stdout, /All invariants held\./)
  for (const fault of ['terminate backends', 'exhaust pool \\(table lock\\)', 'restart PostgreSQL']) {
    t.match(run.stdout, new RegExp(`fault injected: ${fault} \\| [1-9]\\d* times \\| yes`), `${fault} was injected`)
  }
})
