// Row-level security under load (#17): 20,000 interleaved requests from six tenants, 100 at a time,
// over real HTTP, against real policies (ENABLE + FORCE ROW LEVEL SECURITY, a role that owns
// nothing), with handlers that throw, time out and get aborted, writes forged for another tenant,
// handlers that try to shed the role, savepoints, and app backends killed throughout. Not one row
// of another tenant may come back, and not one write may land in another tenant. The same load
// through PgBouncer in transaction mode: test/rls-pgbouncer.test.ts.
import t from 'tap'
import { appBackends, buildApp, createDatabase, waitFor } from './helpers/db.js'
import { listen } from './helpers/http.js'
import { addTenantRoutes, controlForeignRows, createTenantSchema, runTenantLoad, seedTenants, storedFigures, tenantContext } from './helpers/rls.js'

const REQUESTS = 20_000
const CONCURRENCY = 100
const TENANTS = ['t0', 't1', 't2', 't3', 't4', 't5']

t.test(`${REQUESTS} requests, ${TENANTS.length} tenants, ${CONCURRENCY} at a time, backends killed: no row crosses tenants`, { timeout: 240_000 }, async (t) => {
  const db = await createDatabase(t)
  const { role } = await createTenantSchema(db)
  await seedTenants(db, TENANTS)
  const app = await buildApp(db, { max: 10, abortGraceMs: 50, contextRoles: [role], context: tenantContext(role) })
  addTenantRoutes(app, TENANTS)
  const port = await listen(app)

  t.ok(await controlForeignRows(port, 't0') > 0, 'the check finds foreign rows where there is no context (negative control)')
  const figures = await runTenantLoad({
    port,
    requests: REQUESTS,
    concurrency: CONCURRENCY,
    tenants: TENANTS,
    killEveryMs: 250,
    backends: async () => (await appBackends(db)).map((b) => b.pid),
    admin: db.admin
  })
  await waitFor(() => app.db.stats().leased === 0, 5000, 'every client back')
  const stored = await storedFigures(db)
  t.comment(JSON.stringify({ ...figures, perSecond: Math.round(figures.requests / figures.seconds), stored }))

  t.equal(figures.requests, REQUESTS, `${REQUESTS} requests sent`)
  t.equal(figures.foreignRows, 0, `0 rows of another tenant in ${figures.rowsSeen} rows returned`)
  t.ok(figures.rowsSeen > REQUESTS, 'the reads did return rows (the policy lets a tenant see its own)')
  t.equal(stored.foreign_writes, 0, `0 of ${stored.writes} writes landed in another tenant`)
  t.equal(stored.forged, 0, '0 forged writes were stored')
  t.equal(figures.forgedAccepted, 0, 'no forged write was answered 200')
  t.equal(stored.rolled_back, 0, 'rolled-back savepoints left nothing')
  t.equal(stored.moved_seeds, 0, 'no UPDATE moved a row between tenants')
  t.equal(stored.seeds, TENANTS.length * 20, 'no row was lost')
  t.ok(stored.writes > 0 && stored.writes >= figures.writesAnswered, `every write answered 200 is stored (${figures.writesAnswered} answered, ${stored.writes} stored)`)
  t.ok(figures.kills >= 10, `backends were killed during the run (${figures.kills})`)
  t.ok(figures.aborted >= 100, `requests were aborted (${figures.aborted})`)
  t.ok((figures.statuses['/throws 500'] ?? 0) > 500, 'handlers threw')
  t.ok((figures.statuses['/slow 503'] ?? 0) > 50, 'handlers timed out')
  t.ok((figures.statuses['/escape 200'] ?? 0) > 500, 'handlers that tried to shed the role were answered (with their own rows only)')
})
