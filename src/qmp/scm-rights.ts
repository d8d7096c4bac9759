/**
 * File descriptors over unix sockets (SCM_RIGHTS), through the optional
 * native addon in native/scm-rights/ (build: see native/scm-rights/README.md). Node's net module
 * cannot receive ancillary data, so when the addon is present the monitor
 * reads its unix connections with recvmsg() in the addon and keeps the
 * net.Socket for writing only. Without the addon everything works except
 * that no descriptors arrive (getfd then says "No file descriptor supplied
 * via SCM_RIGHTS").
 *
 * FERRY_NO_NATIVE=1 in the environment disables the addon.
 */
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import type * as net from 'node:net';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

interface Addon {
  open(fd: number, cb: (err: number | null, data: Buffer | null, fds: number[]) => void): unknown;
  pause(r: unknown): void;
  resume(r: unknown): void;
  close(r: unknown): void;
  send(fd: number, data: Buffer, fds: number[]): number;
}

let cached: Addon | null | undefined;

function findAddon(): string | undefined {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const p = path.join(dir, 'native', 'scm-rights', 'build', 'Release', 'ferry_scm.node');
    if (fs.existsSync(p)) return p;
    const up = path.dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return undefined;
}

function addon(): Addon | undefined {
  if (cached !== undefined) return cached ?? undefined;
  cached = null;
  if (process.platform === 'win32' || process.env.FERRY_NO_NATIVE === '1') return undefined;
  const p = findAddon();
  if (!p) return undefined;
  try {
    cached = createRequire(import.meta.url)(p) as Addon;
  } catch {
    cached = null;
  }
  return cached ?? undefined;
}

/** True when descriptors can be received/sent (native addon loaded). */
export function scmRightsAvailable(): boolean {
  return addon() !== undefined;
}

/** The OS fd behind a connected unix net.Socket (internal Node handle), if any. */
export function socketFd(sock: net.Socket): number | undefined {
  const h = (sock as unknown as { _handle?: { fd?: unknown } | null })._handle;
  const fd = h?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

export interface ScmReaderCallbacks {
  data(chunk: Buffer, fds: number[]): void;
  end(): void;
  error(errno: number): void;
}

/**
 * Reads a unix socket with recvmsg() (on a dup of its fd). The net.Socket
 * must never read itself: create the server with pauseOnConnect.
 */
export class ScmReader {
  private r: unknown;
  private closed = false;

  private constructor(a: Addon, fd: number, cb: ScmReaderCallbacks) {
    this.r = a.open(fd, (err, data, fds) => {
      if (this.closed) {
        for (const f of fds) closeQuiet(f);
        return;
      }
      if (err !== null) cb.error(err);
      else if (data === null) cb.end();
      else cb.data(data, fds);
    });
    this.addon = a;
  }
  private readonly addon: Addon;

  /** Start reading `sock`, or undefined if the addon or the fd is unavailable. */
  static start(sock: net.Socket, cb: ScmReaderCallbacks): ScmReader | undefined {
    const a = addon();
    const fd = socketFd(sock);
    if (!a || fd === undefined) return undefined;
    try {
      return new ScmReader(a, fd, cb);
    } catch {
      return undefined;
    }
  }

  pause(): void {
    if (!this.closed) this.addon.pause(this.r);
  }

  resume(): void {
    if (!this.closed) this.addon.resume(this.r);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.addon.close(this.r);
  }
}

function closeQuiet(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    /* ignore */
  }
}

/**
 * Write `data` on a connected unix socket with `fds` attached (SCM_RIGHTS).
 * Waits for Node's own write queue to drain first so bytes stay in order.
 */
export async function writeWithFds(sock: net.Socket, data: Buffer, fds: number[]): Promise<void> {
  const a = addon();
  if (!a) throw new Error('passing file descriptors needs the native addon (native/scm-rights/, see its README.md)');
  const fd = socketFd(sock);
  if (fd === undefined) throw new Error('passing file descriptors needs a unix socket');
  if (fds.length > 16) throw new Error('at most 16 file descriptors per message');
  await new Promise<void>((resolve, reject) => {
    sock.write(Buffer.alloc(0), (err) => (err ? reject(err) : resolve()));
  });
  let n = a.send(fd, data, fds);
  for (let tries = 0; n === -11 /* EAGAIN */ && tries < 100; tries++) {
    await new Promise((r) => setTimeout(r, 5));
    n = a.send(fd, data, fds);
  }
  if (n < 0) throw new Error(`sendmsg failed: errno ${-n}`);
  if (n < data.length) sock.write(data.subarray(n));
}
