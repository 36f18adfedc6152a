import type { PoolClient } from 'pg'

/**
 * The slice of `pg.Pool` this plugin uses. A real `pg.Pool` fits; so does a wrapper that injects
 * faults in a test, without patching pg itself.
 */
export interface PostgresPool {
  connect (): Promise<PoolClient>
  // The callback form is the one used per request: no promise per checkout. A pool whose connect()
  // ignores the callback and returns a promise still works.
  connect (callback: (err: Error | undefined, client: PoolClient | undefined, done: (release?: any) => void) => void): void
  end (): Promise<void>
  on (event: 'error', listener: (err: Error, client: PoolClient) => void): unknown
  readonly totalCount: number
  readonly idleCount: number
  readonly waitingCount: number
  readonly ending?: boolean
  readonly options?: { max?: number, connectionTimeoutMillis?: number }
}
