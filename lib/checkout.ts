import type { PoolClient } from 'pg'

/** How a checkout answers: an error (typed 503), or the client. */
export type Taken = (err: Error | null, client?: PoolClient) => void

/** A checkout in callback form as a promise, for the callers that want one. */
export function promised (start: (taken: Taken) => void): Promise<PoolClient> {
  return new Promise((resolve, reject) => {
    start((err, client) => {
      if (err === null) resolve(client as PoolClient)
      else reject(err)
    })
  })
}
