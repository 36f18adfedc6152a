// Tables under real row-level security, for the database-context tests (#17). The login user of
// the test server is a superuser, to whom RLS does not apply: requests must switch to the tenant
// role, which owns nothing, and FORCE makes the policies bind the table's owner too.
import type { TestDatabase } from './db.js'

export interface TenantSchema {
  /** The non-owner role requests run as: unique per database (roles are cluster-wide). */
  role: string
}

/**
 * `notes (id, tenant, body)` under a policy that shows and accepts only the rows of
 * `current_setting('app.tenant_id')`, readable and writable by `role` alone. The role is dropped
 * before the database is.
 */
export async function createTenantSchema (db: TestDatabase): Promise<TenantSchema> {
  const role = `${db.name}_tenant`
  await db.admin.query(`
    CREATE ROLE ${role} NOLOGIN;
    GRANT ${role} TO CURRENT_USER;
    CREATE TABLE notes (id bigserial PRIMARY KEY, tenant text NOT NULL, body text NOT NULL);
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    ALTER TABLE notes FORCE ROW LEVEL SECURITY;
    GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO ${role};
    GRANT USAGE ON SEQUENCE notes_id_seq TO ${role};
    CREATE POLICY tenant_isolation ON notes TO ${role}
      USING (tenant = current_setting('app.tenant_id', true))
      WITH CHECK (tenant = current_setting('app.tenant_id', true));`)
  // Run first of the closers (they run last-pushed first): after every app is closed.
  db.closeFirst.unshift(() => db.admin.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`))
  return { role }
}
