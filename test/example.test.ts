// The example app as a user runs it: no DATABASE_URL (so its own embedded PostgreSQL), real HTTP,
// then SIGTERM: it exits cleanly and leaves no postgres process behind.
import { spawn, execFileSync } from 'node:child_process'
import t from 'tap'

/**
 * Data directories of the embedded PostgreSQL servers whose postmaster is a child of `parent` (or,
 * with no parent given, of any process): other test files run their own servers at the same time.
 */
function embeddedServers (parent?: number): string[] {
  const out = execFileSync('ps', ['-eo', 'ppid=,args=']).toString()
  return out.split('\n').flatMap((line) => {
    const match = /^\s*(\d+)\s+\S*postgres\S*\s.*-D\s+(\S*request-db-pg-\S*)/.exec(line)
    return match !== null && (parent === undefined || Number(match[1]) === parent) ? [match[2]] : []
  })
}

async function json (url: string, init?: RequestInit): Promise<{ status: number, body: any }> {
  const res = await fetch(url, init)
  return { status: res.status, body: await res.json() }
}

t.test('npm start\'s example: embedded database, health, accounts, transfer, clean SIGTERM', { timeout: 120_000 }, async (t) => {
  const env: Record<string, string> = { ...process.env as Record<string, string>, PORT: '0', LOG_LEVEL: 'warn' }
  delete env.DATABASE_URL
  const child = spawn(process.execPath, ['example/server.js'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stderr.on('data', (c) => { output += c })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL') })
  const base = await new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (chunk) => {
      output += chunk
      const match = /listening on (http:\/\/\S+)/.exec(output)
      if (match) resolve(match[1])
    })
    child.on('exit', () => reject(new Error(`example exited early:\n${output}`)))
  })
  const own = embeddedServers(child.pid)
  t.equal(own.length, 1, 'it started its own embedded PostgreSQL')

  const health = await json(`${base}/health`)
  t.equal(health.status, 200)
  t.equal(health.body.status, 'ok')
  const accounts = await json(`${base}/accounts`)
  t.same(accounts.body.map((a: { name: string }) => a.name), ['alice', 'bob', 'carol'])
  const post = (body: object): Promise<{ status: number, body: any }> => json(`${base}/transfers`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body)
  })
  t.equal((await post({ from: 1, to: 3, amount_cents: 2500 })).status, 201)
  t.equal((await post({ from: 3, to: 2, amount_cents: 999999 })).status, 422, 'insufficient funds: rolled back')
  const after = (await json(`${base}/accounts`)).body as Array<{ name: string, balance_cents: number }>
  t.same(after.map((a) => a.balance_cents), [97500, 50000, 2500], 'only the successful transfer moved money')
  t.equal((await json(`${base}/health`)).body.pool.leased, 1, 'health reports the pool; only its own lease held')

  const exported = await fetch(`${base}/accounts.csv`)
  t.equal(exported.status, 200)
  t.equal(await exported.text(), 'id,name,balance_cents\n1,alice,97500\n2,bob,50000\n3,carol,2500\n', 'CSV export, streamed by COPY')
  const importCsv = (body: string): Promise<{ status: number, body: any }> => json(`${base}/accounts.csv`, {
    method: 'POST', headers: { 'content-type': 'text/csv' }, body
  })
  const imported = await importCsv('name,balance_cents\ndave,100\nerin,200\n')
  t.same([imported.status, imported.body], [201, { imported: 2 }], 'CSV import, streamed into COPY')
  const duplicate = await importCsv('name,balance_cents\nfrank,300\nalice,1\n')
  t.equal(duplicate.status, 409, 'a duplicate name: 409')
  const names = (await json(`${base}/accounts`)).body.map((a: { name: string }) => a.name)
  t.same(names, ['alice', 'bob', 'carol', 'dave', 'erin'], 'the failed import left nothing (frank is not there)')

  child.kill('SIGTERM')
  t.equal(await exited, 0, 'exits 0 on SIGTERM')
  t.notOk(embeddedServers().includes(own[0]), 'no orphan postgres process')
})
