#!/usr/bin/env node
// Run a command with DATABASE_URL pointing at a PostgreSQL server: the one already in DATABASE_URL,
// or a throwaway embedded one that lives exactly as long as the command.
//   node scripts/with-postgres.mjs tap
import { spawn } from 'node:child_process'
import { startEmbeddedPostgres } from './embedded-postgres.mjs'

const [command, ...args] = process.argv.slice(2)
if (!command) {
  console.error('usage: node scripts/with-postgres.mjs <command> [args…]')
  process.exit(2)
}

let server = null
if (!process.env.DATABASE_URL) {
  process.stderr.write('Starting an embedded PostgreSQL for this run (set DATABASE_URL to use your own)…\n')
  try {
    server = await startEmbeddedPostgres()
  } catch (err) {
    // An EmbeddedPostgresError's message says what failed and what to do; a stack adds nothing.
    console.error(err.name === 'EmbeddedPostgresError' ? err.message : err)
    process.exit(1)
  }
}

const env = { ...process.env, DATABASE_URL: process.env.DATABASE_URL || server.url }
const child = spawn(command, args, { stdio: 'inherit', env, shell: process.platform === 'win32' })

let stopping = false
async function finish (code) {
  if (stopping) return
  stopping = true
  if (server) await server.stop()
  process.exit(code)
}
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    child.kill(signal)
  })
}
child.on('exit', (code, signal) => finish(code ?? (signal ? 1 : 0)))
child.on('error', (err) => {
  console.error(err.message)
  finish(1)
})
