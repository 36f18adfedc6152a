import type { FastifyBaseLogger } from 'fastify'
import { setTimeout as sleep } from 'node:timers/promises'
import { now } from '../clock.js'
import { FST_REQUEST_DB_CONNECT } from '../errors.js'
import type { ClientHolder } from '../held-clients.js'
import type { ClientGate } from '../pool.js'
import { loggableError } from '../redact.js'

// Between tries: 250 ms, doubling up to 5 s (a database starting in a container is typically up
// within seconds; polling it faster only adds log lines).
const FIRST_DELAY_MS = 250
const MAX_DELAY_MS = 5000

/**
 * `SELECT 1` during registration, so ready() rejects when the database can't be reached. With
 * `connectTimeoutMs`, failed tries are logged and repeated with backoff until that deadline
 * (containers often start before their database); without, one try. The last try starts by the
 * deadline, and may take up to `acquireTimeoutMs` past it.
 */
export async function waitForDatabase (gate: ClientGate, options: { target: string, connectTimeoutMs: number }, log: FastifyBaseLogger): Promise<void> {
  const { target, connectTimeoutMs } = options
  const deadline = now() + connectTimeoutMs
  let delay = FIRST_DELAY_MS
  for (let tries = 1; ; tries++) {
    const err = await tryOnce(gate)
    if (err === null) {
      if (tries > 1) log.info({ tries }, 'fastify-request-db: the database is reachable')
      return
    }
    const root = (err as { cause?: unknown }).cause ?? err
    const code = (root as { code?: string }).code
    const reason = gate.redact(root instanceof Error ? root.message || code || root.name : String(root))
    const left = deadline - now()
    if (connectTimeoutMs === 0) throw new FST_REQUEST_DB_CONNECT(target, reason, { cause: root })
    // A rejected login (SQLSTATE class 28: wrong password, no pg_hba.conf entry) is configuration,
    // not a database still starting: waiting would only delay the same error.
    if (left <= 0 || code?.startsWith('28') === true) {
      throw new FST_REQUEST_DB_CONNECT(target, `${reason} (gave up after ${tries} ${tries === 1 ? 'try' : 'tries'}; connectTimeoutMs=${connectTimeoutMs})`, { cause: root })
    }
    const wait = Math.ceil(Math.min(delay, left))
    log.warn({ err: loggableError(root, gate.redact), tries, retryInMs: wait },
      `fastify-request-db: cannot reach PostgreSQL at ${target} yet; trying again until connectTimeoutMs=${connectTimeoutMs} runs out`)
    await sleep(wait)
    delay = Math.min(delay * 2, MAX_DELAY_MS)
  }
}

/** One `SELECT 1` on a pool client: null when it answered, else what failed. */
async function tryOnce (gate: ClientGate): Promise<unknown> {
  const holder: ClientHolder = { countsAsLease: false, request: null, connectionFailed () {}, forceRelease () {}, checkStillWanted () {} }
  try {
    const client = await gate.acquire(holder)
    try {
      await client.query('SELECT 1')
    } finally {
      gate.release(holder, client, false)
    }
    return null
  } catch (err) {
    return err
  }
}
