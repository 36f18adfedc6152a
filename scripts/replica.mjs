// A real streaming replica (hot standby) of a server started by scripts/embedded-postgres.mjs, for
// the read-replica tests and benchmarks:
//   const primary = await startEmbeddedPostgres()
//   const replica = await startReplica(primary)
//   … read from replica.url; pause it with SELECT pg_wal_replay_pause() on it …
//   await replica.stop()
// The embedded binaries have no pg_basebackup, so the copy is made the way it does it: a
// non-exclusive backup on the primary (pg_backup_start … pg_backup_stop, on one connection), the
// data folder copied meanwhile, pg_backup_stop's label written as backup_label. WAL is not
// copied: the standby streams it from a physical replication slot created before the copy, which
// keeps every segment it needs. initdb's pg_hba.conf already allows replication from 127.0.0.1
// (password), wal_level is `replica` by default, and the primary's superuser may replicate.
import { randomBytes } from 'node:crypto'
import { chown, cp, mkdir, readdir, rm, writeFile, appendFile } from 'node:fs/promises'
import { join } from 'node:path'
import pg from 'pg'
import { launch, makeRunDir, onFreePort, ownedFolder, stopProcess, waitUntilReady } from './embedded-postgres.mjs'

const HOST = '127.0.0.1'
const EXE = process.platform === 'win32' ? '.exe' : ''
// Left out of the copy: the primary's own runtime files, and what the standby makes or streams.
const SKIP_TOP = new Set(['postmaster.pid', 'postmaster.opts', 'pg_wal', 'pg_replslot', 'pg_stat_tmp', 'log', 'backup_label', 'tablespace_map'])

/**
 * Start a hot standby of `primary` on a free loopback port.
 * @param {{ url: string, port: number, user: string, password: string, dataDir: string, binDir: string,
 *   osUser: { name: string, uid: number, gid: number } | null }} primary what startEmbeddedPostgres returned
 * @param {{ log?: (text: string) => void, readyTimeoutMs?: number }} [options]
 * @returns {Promise<{ url: string, host: string, port: number, dataDir: string, slot: string,
 *   stopServer: () => Promise<void>, startServer: () => Promise<void>, stop: () => Promise<void> }>}
 *   `url` has the primary's credentials and the database `postgres`: set the path for another.
 *   `stopServer()` stops it and keeps its files (a replica gone mid-run); `startServer()` starts it
 *   again, and it catches up from its slot; `stop()` stops it, deletes its files and drops the slot.
 */
export async function startReplica (primary, { log = () => {}, readyTimeoutMs = 60_000 } = {}) {
  const { osUser, binDir } = primary
  const slot = `request_db_replica_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: primary.url })
  admin.on('error', () => {})
  await admin.connect()
  let runDir = null
  let server = null
  let slotMade = false
  try {
    // Before the copy: from here the primary keeps every WAL segment the standby will ask for.
    await admin.query('SELECT pg_create_physical_replication_slot($1, true)', [slot])
    slotMade = true
    const maxConnections = (await admin.query('SHOW max_connections')).rows[0].max_connections

    runDir = await makeRunDir(osUser)
    const dataDir = join(runDir, 'data')
    const socketDir = join(runDir, 'socket')
    await ownedFolder(socketDir, 0o755, osUser)

    // fast = true: an immediate checkpoint rather than a spread one.
    await admin.query("SELECT pg_backup_start('request-db-replica', true)")
    await cp(primary.dataDir, dataDir, {
      recursive: true,
      filter: (source) => {
        const rel = source.slice(primary.dataDir.length + 1)
        return !SKIP_TOP.has(rel.split('/')[0]) || rel === ''
      }
    })
    const { rows: [stopped] } = await admin.query('SELECT labelfile FROM pg_backup_stop(false)')
    for (const folder of ['pg_wal', 'pg_wal/archive_status', 'pg_replslot', 'pg_stat_tmp']) await mkdir(join(dataDir, folder), { recursive: true })
    await writeFile(join(dataDir, 'backup_label'), stopped.labelfile)
    await writeFile(join(dataDir, 'standby.signal'), '')
    const conninfo = `host=${HOST} port=${Number(primary.port)} user=${primary.user} password=${primary.password} application_name=${slot}`
    // In the standby's own 0700 folder, as pg_basebackup -R writes it.
    await appendFile(join(dataDir, 'postgresql.auto.conf'), `primary_conninfo = '${conninfo.replace(/'/g, "''")}'\nprimary_slot_name = '${slot}'\nhot_standby = on\n`)
    if (osUser !== null) await chownTree(dataDir, osUser)

    const args = (port) => ['-D', dataDir, '-p', String(port),
      '-c', `listen_addresses=${HOST}`, '-c', `unix_socket_directories=${socketDir}`,
      // A standby needs at least the primary's max_connections.
      '-c', `max_connections=${maxConnections}`,
      '-c', 'fsync=off', '-c', 'full_page_writes=off',
      // Replies to the primary often, so its view of the standby (pg_stat_replication) stays fresh.
      '-c', 'wal_receiver_status_interval=1s', '-c', 'hot_standby_feedback=on']
    const startOn = async (onPort) => {
      server = launch(join(binDir, 'postgres' + EXE), args(onPort), { cwd: runDir, osUser, log })
      await waitUntilReady(server, { port: onPort, password: primary.password, readyTimeoutMs })
    }
    const port = await onFreePort(startOn)
    await admin.end()

    const url = new URL(primary.url)
    url.port = String(port)
    let gone = false
    return {
      url: url.toString(),
      host: HOST,
      port,
      dataDir,
      slot,
      async stopServer () {
        await stopProcess(server)
      },
      async startServer () {
        if (server.exit === null) return
        await startOn(port)
      },
      async stop () {
        if (gone) return
        gone = true
        await stopProcess(server)
        await rm(runDir, { recursive: true, force: true })
        await dropSlot(primary.url, slot)
      }
    }
  } catch (err) {
    await stopProcess(server, 'SIGQUIT')
    if (runDir !== null) await rm(runDir, { recursive: true, force: true }).catch(() => {})
    await admin.query('SELECT pg_backup_stop(false)').catch(() => {})
    await admin.end().catch(() => {})
    if (slotMade) await dropSlot(primary.url, slot)
    throw err
  }
}

/** Drop the standby's slot, so the primary stops keeping WAL for it. Never throws. */
async function dropSlot (url, slot) {
  const client = new pg.Client({ connectionString: url })
  client.on('error', () => {})
  try {
    await client.connect()
    // The walsender may take a moment to notice its standby went.
    for (let i = 0; i < 50; i++) {
      const { rows } = await client.query('SELECT active FROM pg_replication_slots WHERE slot_name = $1', [slot])
      if (rows.length === 0) return
      if (!rows[0].active) {
        await client.query('SELECT pg_drop_replication_slot($1)', [slot])
        return
      }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  } catch {} finally {
    await client.end().catch(() => {})
  }
}

async function chownTree (dir, { uid, gid }) {
  await chown(dir, uid, gid)
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) await chownTree(path, { uid, gid })
    else await chown(path, uid, gid)
  }
}
