// One benchmarked app in its own process (bench/app.js), for bench/run.js and bench/noise.js.
import { fork } from 'node:child_process'

/**
 * Start variant `name`; resolves once it listens. `next()` waits for the app's next message (the
 * answer to 'measure' or 'report'). `wrapper`: a command and its arguments to run Node under
 * (bench/instructions.js runs it under valgrind). `app`: another checkout's bench/app.js, to count
 * that checkout's build of the variant (bench/instructions.js --baseline).
 */
export function startApp (name, wrapper = null, app = new URL('./app.js', import.meta.url)) {
  return new Promise((resolve, reject) => {
    const under = wrapper === null ? {} : { execPath: wrapper[0], execArgv: wrapper.slice(1) }
    const child = fork(app, [name], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], ...under })
    const waiters = []
    child.on('message', (msg) => {
      if (msg.type === 'ready') resolve({ child, port: msg.port, next: () => new Promise((r) => waiters.push(r)) })
      else waiters.shift()?.(msg)
    })
    child.once('exit', (code) => reject(new Error(`${name} exited (${code}) before it was ready`)))
  })
}

/** Close the app and wait for its process to exit. */
export async function stopApp (app) {
  const exited = new Promise((resolve) => app.child.once('exit', resolve))
  app.child.send('close')
  await exited
}
