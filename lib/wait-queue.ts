import { startupScope, timeoutIn } from './async-context.js'
import type { Taken } from './checkout.js'
import { now } from './clock.js'

/** A checkout waiting for a client; the queue keeps them in arrival order, as pg-pool serves them. */
export class Waiter {
  answered = false
  next: Waiter | null = null
  readonly taken: Taken
  readonly deadline: number

  constructor (taken: Taken, deadline: number) {
    this.taken = taken
    this.deadline = deadline
  }
}

/**
 * The checkouts waiting for a client, each answered with a timeout at its deadline. One timer for
 * all of them: pg-pool's connectionTimeoutMillis starts and clears a timer on every checkout, idle
 * client or not, which cost ≈ 1–1.5 µs of user CPU per request with real PostgreSQL under load.
 * Every waiter gets the same wait, so deadlines come in arrival order and only the oldest matters.
 */
export class WaitQueue {
  /** Waiters not answered yet. */
  size = 0
  private head: Waiter | null = null
  private tail: Waiter | null = null
  private timer: NodeJS.Timeout | null = null
  private readonly ms: number
  private readonly expired: (waiter: Waiter) => void
  // Made at registration: the timer serves every waiter, so it runs in no request's context.
  private readonly scope = startupScope('wait-queue')

  constructor (ms: number, expired: (waiter: Waiter) => void) {
    this.ms = ms
    this.expired = expired
  }

  add (taken: Taken): Waiter {
    const waiter = new Waiter(taken, now() + this.ms)
    if (this.tail === null) this.head = waiter
    else this.tail.next = waiter
    this.tail = waiter
    this.size++
    if (this.timer === null) this.arm(this.ms)
    return waiter
  }

  /** The waiter got its answer. pg-pool answers in order, so this is nearly always the oldest. */
  answered (waiter: Waiter): void {
    if (waiter.answered) return
    waiter.answered = true
    this.size--
    this.dropAnswered()
  }

  private dropAnswered (): void {
    let head = this.head
    while (head !== null && head.answered) {
      const next = head.next
      // Unlinked as it leaves: a waiter V8 already moved to the old generation would otherwise keep
      // every later one alive until the next full collection (the benchmark's RSS tripled).
      head.next = null
      head = next
    }
    this.head = head
    if (head === null) this.tail = null
  }

  private arm (ms: number): void {
    // Left running when the queue empties: re-arming per request is the cost this class avoids.
    this.timer = timeoutIn(this.scope, ms, () => this.expire())
  }

  private expire (): void {
    this.timer = null
    const at = now()
    for (let waiter = this.head; waiter !== null && waiter.deadline <= at; waiter = waiter.next) {
      if (!waiter.answered) {
        waiter.answered = true
        this.size--
        this.expired(waiter)
      }
    }
    this.dropAnswered()
    if (this.head !== null) this.arm(Math.max(1, Math.ceil(this.head.deadline - at)))
  }
}
