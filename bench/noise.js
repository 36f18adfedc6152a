// npm run bench:noise: how precise is one ratio on this machine? Two app processes of the same
// variant, alive together, the load switched between them every --slice seconds; per pair of
// processes, the ratio of their responses. Both sides are the same code, so every departure from
// 1 is the machine's noise. Options: --variant raw-pool, --slices 6, --slice 1, --pairs 4
import { parseArgs } from 'node:util'
import autocannon from 'autocannon'
import { startApp, stopApp } from './app-process.js'

const { values: args } = parseArgs({
  options: {
    variant: { type: 'string', default: 'raw-pool' },
    slices: { type: 'string', default: '6' },
    slice: { type: 'string', default: '1' },
    pairs: { type: 'string', default: '4' }
  }
})
if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set: run through `npm run bench:noise`')

async function served (app, seconds) {
  const result = await autocannon({ url: `http://127.0.0.1:${app.port}/q?n=7`, connections: 100, duration: seconds })
  return result.requests.total
}

const ratios = []
for (let pair = 0; pair < Number(args.pairs); pair++) {
  const a = await startApp(args.variant)
  const b = await startApp(args.variant)
  await served(a, 2)
  await served(b, 2)
  let totalA = 0
  let totalB = 0
  const perSlice = []
  for (let i = 0; i < Number(args.slices); i++) {
    // Alternate which side goes first, as bench/run.js alternates its order.
    const [first, second] = i % 2 === 0 ? [a, b] : [b, a]
    const x = await served(first, Number(args.slice))
    const y = await served(second, Number(args.slice))
    const [fromA, fromB] = i % 2 === 0 ? [x, y] : [y, x]
    totalA += fromA
    totalB += fromB
    perSlice.push((fromB / fromA).toFixed(3))
  }
  ratios.push(totalB / totalA)
  console.log(`pair ${pair + 1}: ${(totalB / totalA).toFixed(3)} (slices: ${perSlice.join(' ')})`)
  await stopApp(a)
  await stopApp(b)
}
const mean = ratios.reduce((s, x) => s + x, 0) / ratios.length
const sd = Math.sqrt(ratios.reduce((s, x) => s + (x - mean) ** 2, 0) / Math.max(1, ratios.length - 1))
console.log(`${args.variant} against itself, ${args.slices} × ${args.slice} s a side: mean ${mean.toFixed(3)}, standard deviation ${(sd * 100).toFixed(1)} %`)
