// SeriesHistogram, the Prometheus integration's cheap histogram, exports what prom-client's own
// Histogram exports for the same observations: a scrape can't tell them apart.
import { Histogram, Registry } from 'prom-client'
import t from 'tap'
import { SeriesHistogram } from '../lib/integrations/prometheus-histogram.js'

const buckets = [0.001, 0.01, 0.1, 1]
const observations: Array<[string, string, number]> = [
  ['SELECT', '', 0.0004], ['SELECT', '', 0.001], ['SELECT', '', 0.05], ['INSERT', '', 2.5],
  ['SELECT', '57014', 0.2], ['SELECT', '', 0.0099], ['INSERT', '', 0]
]

function pair () {
  const ours = new Registry()
  const theirs = new Registry()
  const config = { name: 'op_seconds', help: 'Statements', labelNames: ['pool_name', 'op', 'error_type'] as const, buckets }
  return {
    ours,
    theirs,
    series: new SeriesHistogram({ ...config, registers: [ours] }),
    histogram: new Histogram({ ...config, labelNames: [...config.labelNames], registers: [theirs] })
  }
}

t.test('the same samples as prom-client\'s Histogram, as text and as JSON', async (t) => {
  const { ours, theirs, series, histogram } = pair()
  for (const [op, error, seconds] of observations) {
    const labels = { pool_name: 'db', op, error_type: error }
    series.record(series.seriesFor(`${op} ${error}`, labels), seconds)
    histogram.observe(labels, seconds)
  }
  const text = await ours.metrics()
  t.equal(text, await theirs.metrics(), 'the scrape is the same text')
  t.match(text, 'op_seconds_bucket{le="0.01",pool_name="db",op="SELECT",error_type=""} 3', 'cumulative buckets')
  t.match(text, 'op_seconds_count{pool_name="db",op="INSERT",error_type=""} 2')
  t.same(await ours.getMetricsAsJSON(), await theirs.getMetricsAsJSON(), 'and the same JSON')
})

t.test('a series is made once per key, and observe()/labels() still count', async (t) => {
  const { ours, series } = pair()
  const labels = { pool_name: 'db', op: 'SELECT', error_type: '' }
  t.equal(series.seriesFor('k', labels), series.seriesFor('k', { ...labels, op: 'ignored' }), 'the key finds the first series')
  series.observe({ pool_name: 'db', op: 'UPDATE', error_type: '' }, 0.5)
  series.labels({ pool_name: 'db', op: 'DELETE', error_type: '' }).observe(0.5)
  const text = await ours.metrics()
  t.match(text, 'op_seconds_count{pool_name="db",op="UPDATE",error_type=""} 1')
  t.match(text, 'op_seconds_count{pool_name="db",op="DELETE",error_type=""} 1')
  series.reset()
  t.notMatch(await ours.metrics(), '_count', 'reset() empties both kinds')
})
