// Schema and seed data, created at start if missing.
export async function createSchema (db) {
  await db.transaction(async (tx) => {
    await tx.query(`CREATE TABLE IF NOT EXISTS accounts (
      id serial PRIMARY KEY,
      name text NOT NULL UNIQUE,
      balance_cents bigint NOT NULL CHECK (balance_cents >= 0)
    )`)
    await tx.query(`CREATE TABLE IF NOT EXISTS transfers (
      id serial PRIMARY KEY,
      from_id int NOT NULL REFERENCES accounts (id),
      to_id int NOT NULL REFERENCES accounts (id),
      amount_cents bigint NOT NULL CHECK (amount_cents > 0),
      created_at timestamptz NOT NULL DEFAULT now()
    )`)
    await tx.query(`INSERT INTO accounts (name, balance_cents)
      VALUES ('alice', 100000), ('bob', 50000), ('carol', 0)
      ON CONFLICT (name) DO NOTHING`)
  })
}
