import autocannon from 'autocannon'
import { variants } from './variants.js'
const name = process.argv[2]
const app = await variants[name].build(process.env.DATABASE_URL)
await app.listen({ port: 0 })
const port = app.server.address().port
const { Session } = await import('node:inspector/promises')
const s = new Session(); s.connect()
await autocannon({ url: `http://127.0.0.1:${port}/q?n=7`, connections: 50, duration: 2 })
await s.post('Profiler.enable'); await s.post('Profiler.start')
const r = await autocannon({ url: `http://127.0.0.1:${port}/q?n=7`, connections: 50, duration: 5 })
const { profile } = await s.post('Profiler.stop')
const self = new Map(); const total = profile.samples.length
const byId = new Map(profile.nodes.map(n => [n.id, n]))
const counts = new Map(); for (const id of profile.samples) counts.set(id, (counts.get(id) ?? 0) + 1)
for (const [id, c] of counts) { const n = byId.get(id); const k = `${n.callFrame.functionName || '(anon)'} ${n.callFrame.url.split('/').slice(-2).join('/')}:${n.callFrame.lineNumber}`; self.set(k, (self.get(k) ?? 0) + c) }
console.log(name, r.requests.average, 'req/s')
for (const [k, c] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log((100 * c / total).toFixed(1) + '%', k)
await app.close()
