/**
 * How a migration channel winds down. Both sides use these; nothing else in
 * the engine ends, lingers on or closes a channel by hand.
 *
 *  - endOutput: the source's last byte is written; end our direction and
 *    wait until the bytes are handed to the OS (without a return path this
 *    is how the destination learns of the end).
 *  - linger: give the peer a bounded time to close by itself, so that an
 *    exec: forwarder (socat, `cat > f; sync`) gets to pass the tail of the
 *    stream on before close() signals it.
 *  - closeAfterShut: the destination is done (it sent its SHUT, or it
 *    completed without a return path). It ends its direction
 *    and swallows whatever the source still sends until the source closes
 *    (or for a bounded time). Closing at once could make the source's next
 *    write fail (EPIPE) and its socket be destroyed with the SHUT unread, and
 *    the source needs the SHUT: SHUT 0 is what completes it, and a failing
 *    SHUT before PONG 3 tells it that our guest never ran, so that it may run
 *    its own again.
 */
import type { Channel } from './channel.js';

/** How long a finished source waits for its channel to close by itself. */
export const LINGER_MS = 5000;
/** How long a destination keeps reading after its SHUT, at most. */
export const SHUT_LINGER_MS = 1000;

/** End the forward direction; resolves once the bytes are handed to the OS. */
export function endOutput(ch: Channel): Promise<void> {
  return new Promise((resolve, reject) => {
    const out = ch.output;
    // a closed channel (migrate_cancel) ends nothing more: the caller checks why
    if (out.writableFinished || out.destroyed) return resolve();
    const done = (e?: Error | null): void => {
      out.off('close', onClose);
      out.off('error', done);
      if (e) reject(e);
      else resolve();
    };
    const onClose = (): void => done();
    out.once('error', done);
    out.once('close', onClose);
    out.end(() => done());
  });
}

/**
 * Resolves when the channel has released everything (the peer closed, an
 * exec: child exited), when `signal` aborts, or after `ms`, whichever comes
 * first. Never closes the channel itself.
 */
export function linger(ch: Channel, ms = LINGER_MS, signal?: AbortSignal): Promise<void> {
  if (ch.released || signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      ch.off('close', done);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    ch.once('close', done);
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** After our SHUT (see the file header): end our side, drain theirs, then close. */
export function closeAfterShut(ch: Channel, ms = SHUT_LINGER_MS): void {
  ch.input.removeAllListeners('data');
  ch.input.on('data', () => undefined);
  ch.input.resume();
  ch.output.end();
  setTimeout(() => ch.close(), ms).unref();
  ch.input.once('end', () => ch.close());
}
