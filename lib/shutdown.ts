import type { FastifyInstance } from 'fastify'
import { startupScope, timeoutIn } from './async-context.js'
import type { ClientGate } from './pool.js'

// After forcing: how long cancelled statements get to stop before onClose moves on.
const FORCED_RELEASE_MS = 2000

/**
 * preClose: from the first moment of close(), no new connection is handed out (503), and a
 * deadline starts. Requests still running keep the HTTP server's close waiting, and onClose runs
 * only after it, so the deadline has to start here: at shutdownTimeoutMs their statements are
 * cancelled, which lets them finish. onClose: wait for what is still held and force the rest, so
 * that the pool's owner (@fastify/postgres, whose onClose runs after this one) can end it: pg-pool's
 * end() waits forever for a client that is never given back.
 */
export function addShutdownHooks (fastify: FastifyInstance, gate: ClientGate, shutdownTimeoutMs: number): void {
  let deadline: NodeJS.Timeout | null = null
  let startedAt = 0
  // close() may be called from a request (an admin route): the deadline is the app's, not its.
  const scope = startupScope('shutdown')

  fastify.addHook('preClose', function stopHandingOut (done) {
    gate.closing = true
    startedAt = Date.now()
    deadline = timeoutIn(scope, shutdownTimeoutMs, () => {
      if (gate.stats().leased > 0) fastify.log.warn('fastify-request-db: shutdown timeout reached; cancelling requests\' statements')
      gate.forceReleaseAll()
    })
    done()
  })

  fastify.addHook('onClose', async function giveEverythingBack () {
    // close() without a preceding preClose can't happen in Fastify, but ready() may have failed.
    gate.closing = true
    const left = Math.max(0, shutdownTimeoutMs - (startedAt === 0 ? 0 : Date.now() - startedAt))
    if (await gate.waitForHolders(left) > 0) {
      gate.forceReleaseAll()
      await gate.waitForHolders(FORCED_RELEASE_MS)
    }
    if (deadline !== null) clearTimeout(deadline)
  })
}
