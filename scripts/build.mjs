// Build dist/esm (import) and dist/cjs (require) from lib/, declarations included.
import { execFileSync } from 'node:child_process'
import { rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'

const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
rmSync('dist', { recursive: true, force: true })
for (const project of ['tsconfig.build.json', 'tsconfig.cjs.json']) {
  execFileSync(process.execPath, [tsc, '-p', project], { stdio: 'inherit' })
}
// The package is "type": "module"; this marks the CommonJS half as such.
writeFileSync('dist/cjs/package.json', '{ "type": "commonjs" }\n')
