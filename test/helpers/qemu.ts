/**
 * Interop harness: start a real QEMU (qemu-system-x86_64, TCG) with a QMP unix
 * socket, talk QMP to it with our own QmpClient, stop it.
 *
 * Tests that need QEMU use `QEMU_SKIP` as node:test's `skip` option: it is
 * false when the binary exists, otherwise a reason string.
 */
import { accessSync, constants, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { freePort, qemuArgv } from '../../src/cli/launch.js';
import { QmpProcess, REPO_ROOT, killTracked, runToExit, tempDir, track, waitMigration } from './vm.js';

export { freePort };

export const QEMU_BIN = process.env.FERRY_QEMU ?? '/usr/bin/qemu-system-x86_64';

function executable(p: string): boolean {
  try {
    accessSync(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** false when QEMU is usable, else the reason to skip. */
export const QEMU_SKIP: false | string = executable(QEMU_BIN) ? false : `${QEMU_BIN} is not installed`;

/** The stream vectors, each checked against QEMU 7.2 (see its README.md). */
export const VECTORS_DIR = resolve(REPO_ROOT, 'test/golden/streams');

/** `-machine none` with one 16 MiB RAM backend `m`, as in the spec's interop section. */
export const MEM = 16 << 20;
export const QEMU_RAM_ARGS = ['-machine', 'none,memory-backend=m', '-object', `memory-backend-ram,id=m,size=16M`];
/** The same 16 MiB `m`, its bytes read from an image file (copy on write: the file stays as it is). */
export const qemuImageArgs = (imagePath: string): string[] => ['-machine', 'none,memory-backend=m', '-object', `memory-backend-file,id=m,size=16M,mem-path=${imagePath},share=off`];
/** A Ferry source that QEMU can load: 16 MiB `m`, and x-qemu-compat (only the device sections QEMU knows). */
export const FERRY_COMPAT_ARGS = ['-machine', 'none,memory-backend=m,x-qemu-compat=on', '-object', 'memory-backend-ram,id=m,size=16M'];

export interface QemuOptions {
  /** extra arguments (the harness adds -nodefaults -display none -qmp) */
  args: string[];
  dir?: string;
  name?: string;
  /** wait for the QMP socket this long (default 20 s) */
  timeoutMs?: number;
}

/** A QEMU under test: its commands time out after 30 s. */
export class QemuHandle extends QmpProcess {
  /** pmemsave the whole guest RAM and return it. */
  async ram(size = MEM, file = join(this.dir, `qemu-${Date.now()}-${Math.random().toString(36).slice(2)}.ram`)): Promise<Buffer> {
    await this.execute('pmemsave', { val: 0, size, filename: file });
    return readFileSync(file);
  }
}

export async function startQemu(opts: QemuOptions): Promise<QemuHandle> {
  const dir = opts.dir ?? tempDir('ferry-qemu-');
  const sock = join(dir, `${opts.name ?? 'qemu'}.qmp`);
  const h = new QemuHandle(QEMU_BIN, qemuArgv(sock, opts.args), {
    sock,
    dir,
    what: 'qemu',
    timeoutMs: opts.timeoutMs,
    commandTimeoutMs: 30000,
  });
  return track(h).ready();
}

/** Run QEMU to completion without QMP (e.g. to see a startup / load error). */
export function runQemu(args: string[], timeoutMs = 20000): Promise<{ code: number | null; stderr: string }> {
  return runToExit(QEMU_BIN, ['-nodefaults', '-display', 'none', ...args], timeoutMs);
}

/** Poll QEMU's query-migrate until the status is one of `states`. */
export function waitQemuMigration(
  q: QemuHandle,
  states: string[] = ['completed', 'failed', 'cancelled'],
  timeoutMs = 30000,
): Promise<Record<string, any>> {
  return waitMigration(q, states, timeoutMs);
}

/** pmemsave of a Ferry VM (anything with execute()) into `dir`. */
export async function pmem(vm: { execute(cmd: string, args?: object): Promise<unknown> }, dir: string, size = MEM): Promise<Buffer> {
  const file = join(dir, `ferry-${Date.now()}-${Math.random().toString(36).slice(2)}.ram`);
  await vm.execute('pmemsave', { val: 0, size, filename: file });
  return readFileSync(file);
}

export function readExpect(name: string): Buffer {
  return gunzipSync(readFileSync(join(VECTORS_DIR, `${name}.expect.gz`)));
}

/** First differing offset of two buffers, or -1 (for readable assertion messages). */
export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

export function assertSameRam(actual: Buffer, expected: Buffer, what: string): void {
  const d = firstDiff(actual, expected);
  if (d !== -1) {
    throw new Error(
      `${what}: RAM differs at offset 0x${d.toString(16)} (page ${d >> 12}); lengths ${actual.length}/${expected.length}; ` +
        `got ${actual.subarray(d, d + 8).toString('hex')} want ${expected.subarray(d, d + 8).toString('hex')}`,
    );
  }
}

/** Kill every QEMU still running (call from after(), before cleanupAll). */
export function cleanupQemu(): Promise<void> {
  return killTracked((h) => h instanceof QemuHandle);
}
