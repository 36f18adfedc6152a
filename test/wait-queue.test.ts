// The waiting checkouts' deadlines: one timer for all of them, answered in arrival order.
import t from 'tap'
import { WaitQueue } from '../lib/wait-queue.js'

const never = (): void => {}
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

t.test('waiters leave unlinked, in order, and one answered early waits for those before it', async (t) => {
  const queue = new WaitQueue(60_000, () => t.fail('nothing expires here'))
  const [a, b, c] = [queue.add(never), queue.add(never), queue.add(never)]
  t.equal(queue.size, 3, 'three waiting (maxWaiting counts these)')
  queue.answered(b)
  t.equal(queue.size, 2)
  t.equal(a.next, b, 'b stays queued behind a')
  t.equal(b.next, c)
  queue.answered(a)
  // A waiter that left still pointing at the next one would keep every later waiter alive once
  // V8 has promoted it: the benchmark's RSS tripled before they were unlinked.
  t.equal(a.next, null, 'a is unlinked as it leaves')
  t.equal(b.next, null, 'and so is b, answered earlier')
  queue.answered(c)
  queue.answered(c)
  t.equal(c.next, null)
  t.equal(queue.size, 0, 'each counted out once')
})

t.test('each waiter not answered by its deadline expires, oldest first; answered ones never do', async (t) => {
  const expired: string[] = []
  const names = new Map<unknown, string>()
  const queue = new WaitQueue(50, (waiter) => expired.push(names.get(waiter) ?? '?'))
  const started = Date.now()
  names.set(queue.add(never), 'a')
  const b = queue.add(never)
  names.set(b, 'b')
  await sleep(20)
  names.set(queue.add(never), 'c')
  queue.answered(b)
  await sleep(45)
  t.same(expired, ['a'], 'a expired at its deadline; c is not due yet')
  await sleep(40)
  t.same(expired, ['a', 'c'], 'then c, on the same timer re-armed; b was answered')
  t.equal(queue.size, 0)
  t.ok(Date.now() - started < 1000)
})
