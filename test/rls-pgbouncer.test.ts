// Row-level security through PgBouncer in transaction mode (#17). The app's 20 connections share
// four server connections, so consecutive transactions of different requests (and of an outside
// client) run on the same backend. A context set with set_config(…, true) and the role as
// set_config('role', …, true) ends with its transaction, so nothing of one tenant reaches the next
// transaction on that backend: a session-level SET would. The app runs with `pooler: 'transaction'`
// as an app behind PgBouncer should (the context needs nothing more from it: it is transaction-local
// either way); the load is test/helpers/rls.ts's, as in test/rls-load.test.ts.
import pg from 'pg'
import t from 'tap'
import { startPgBouncer } from '../scripts/pgbouncer.mjs'
import { adminUrl, buildApp, createDatabase, type TestDatabase, waitFor } from './helpers/db.js'
import { listen } from './helpers/http.js'
import { havePgBouncer } from './helpers/pgbouncer.js'
import { addTenantRoutes, controlForeignRows, createTenantSchema, runTenantLoad, seedTenants, storedFigures, tenantContext } from './helpers/rls.js'

const REQUESTS = 10_000
const CONCURRENCY = 100
const TENANTS = ['t0', 't1', 't2', 't3', 't4', 't5']
const SERVER_CONNECTIONS = 4

if (havePgBouncer(t, 'test/rls-pgbouncer.test.ts (row-level security through PgBouncer)')) {
  t.test(`${REQUESTS} requests through PgBouncer (transaction mode, ${SERVER_CONNECTIONS} server connections): no tenant reaches another's transaction`, { timeout: 180_000 }, async (t) => {
    const server = new URL(adminUrl)
    const bouncer = await startPgBouncer({
      target: { host: server.hostname, port: Number(server.port), user: decodeURIComponent(server.username), password: decodeURIComponent(server.password) },
      poolSize: SERVER_CONNECTIONS
    })
    t.teardown(() => bouncer.stop())
    const through = (db: TestDatabase): string => {
      const url = new URL(bouncer.url)
      url.pathname = `/${db.name}`
      return url.toString()
    }

    const db = await createDatabase(t)
    const { role } = await createTenantSchema(db)
    await seedTenants(db, TENANTS)
    const app = await buildApp(db, { connectionString: through(db), pooler: 'transaction', max: 20, abortGraceMs: 50, contextRoles: [role], context: tenantContext(role) })
    addTenantRoutes(app, TENANTS)
    const port = await listen(app)

    // An outside client through the same PgBouncer, between the app's transactions: it must never
    // run as the tenant role or see a tenant's setting.
    const outside = new pg.Pool({ connectionString: through(db), max: 2 })
    outside.on('error', () => {})
    t.teardown(() => outside.end())
    let observing = true
    const seen = { checks: 0, leaks: 0 }
    const observer = (async () => {
      while (observing) {
        const row = await outside.query("SELECT current_user AS who, current_setting('app.tenant_id', true) AS tenant")
          .then((r) => r.rows[0], () => null)
        if (row !== null) {
          seen.checks++
          if (row.who === role || (row.tenant !== null && row.tenant !== '')) seen.leaks++
        }
      }
    })()

    t.ok(await controlForeignRows(port, 't0') > 0, 'the check finds foreign rows where there is no context (negative control)')
    const figures = await runTenantLoad({
      port,
      requests: REQUESTS,
      concurrency: CONCURRENCY,
      tenants: TENANTS,
      killEveryMs: 500,
      // PgBouncer's server connections, killed on the server itself.
      backends: async () => (await db.admin.query(`SELECT pid FROM pg_stat_activity WHERE datname = $1
        AND backend_type = 'client backend' AND application_name <> 'test-admin' AND pid <> pg_backend_pid()`, [db.name])).rows.map((r) => r.pid),
      admin: db.admin
    })
    observing = false
    await observer
    await waitFor(() => app.db.stats().leased === 0, 5000, 'every client back')
    const stored = await storedFigures(db)
    t.comment(JSON.stringify({ ...figures, perSecond: Math.round(figures.requests / figures.seconds), stored, outside: seen }))

    t.equal(figures.foreignRows, 0, `0 rows of another tenant in ${figures.rowsSeen} rows returned`)
    t.ok(figures.rowsSeen > REQUESTS, 'the reads did return rows')
    t.equal(stored.foreign_writes, 0, `0 of ${stored.writes} writes landed in another tenant`)
    t.equal(stored.forged, 0, '0 forged writes were stored')
    t.equal(stored.moved_seeds, 0, 'no UPDATE moved a row between tenants')
    t.ok(stored.writes >= figures.writesAnswered && figures.writesAnswered > 0, 'every write answered 200 is stored')
    t.ok(seen.checks > 50, `the outside client ran between the app's transactions (${seen.checks} times)`)
    t.equal(seen.leaks, 0, 'it never ran as the tenant role nor saw a tenant setting')
    t.ok(figures.kills >= 2, `server connections were killed (${figures.kills})`)
  })
}
