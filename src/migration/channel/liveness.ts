/**
 * A bound on how long a dead peer goes unnoticed on a TCP migration socket.
 *
 * Without it a partition (a link down, packets dropped) in the middle of
 * the stream is seen only when the kernel gives up retransmitting, after
 * about 15 minutes (tcp_retries2), and a destination that only reads sees
 * nothing at all. Every tcp: migration socket, on both sides, gets:
 *
 *  - TCP keepalive after KEEPALIVE_IDLE_MS of silence (libuv then probes
 *    every second): an idle reader (a destination without a return path,
 *    a source waiting for its return path) learns that the peer is gone;
 *  - TCP_USER_TIMEOUT = USER_TIMEOUT_MS (native/scm-rights): the kernel
 *    drops the connection with ETIMEDOUT once sent data has stayed
 *    unacknowledged, or keepalive probes unanswered, that long. A writer
 *    (the source in the middle of a pass) is covered by this.
 *
 * Without the addon (or with FERRY_NO_NATIVE=1) a pure-JS watchdog stands in
 * for TCP_USER_TIMEOUT on the sending side: bytes queued and none handed to
 * the kernel for USER_TIMEOUT_MS destroys the socket with ETIMEDOUT; the
 * reading side then relies on keepalive alone (libuv: 10 probes a second
 * apart, so about KEEPALIVE_IDLE_MS + 10 s).
 *
 * So a partition fails the migration on both sides within
 * DETECTION_BOUND_MS (docs/reliability.md, "Network faults"); a slow link
 * (a bandwidth cap) still acknowledges, and does not trip it.
 */
import type { Socket } from 'node:net';
import { setTcpUserTimeout } from '../../base/native.js';

export const KEEPALIVE_IDLE_MS = 2000;
export const USER_TIMEOUT_MS = 10000;
/** user timeout + keepalive idle + one probe interval of slack */
export const DETECTION_BOUND_MS = USER_TIMEOUT_MS + KEEPALIVE_IDLE_MS + 1000;

/** Arm keepalive and the user timeout on a connected TCP socket (unix sockets are left alone). */
export function armLiveness(sock: Socket): void {
  if (sock.remoteFamily === undefined) return; // AF_UNIX: a peer that dies closes it
  sock.setKeepAlive(true, KEEPALIVE_IDLE_MS);
  const fd = (sock as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  if (typeof fd === 'number' && fd >= 0 && setTcpUserTimeout(fd, USER_TIMEOUT_MS)) return;
  watchWrites(sock, USER_TIMEOUT_MS);
}

/** The pure-JS stand-in: queued bytes that make no progress for `ms` end the socket. */
function watchWrites(sock: Socket, ms: number): void {
  let last = sock.bytesWritten;
  let since = Date.now();
  const t = setInterval(() => {
    const now = Date.now();
    const written = sock.bytesWritten;
    if (written !== last || sock.writableLength === 0) {
      last = written;
      since = now;
    } else if (now - since >= ms) {
      clearInterval(t);
      const err = Object.assign(new Error('connect ETIMEDOUT'), { code: 'ETIMEDOUT', errno: -110, syscall: 'write' });
      sock.destroy(err);
    }
  }, Math.min(1000, ms / 4));
  t.unref();
  sock.once('close', () => clearInterval(t));
}
