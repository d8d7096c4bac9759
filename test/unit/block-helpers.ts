/**
 * Helpers of the block tests: temporary directories that are removed after
 * the test file, QEMU's own tools (qemu-img, qemu-io) as the reference, and a
 * seeded PRNG for random writes.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A fresh directory under os.tmpdir(), removed when the test file ends. */
export function tmpDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'ferry-block-'));
  dirs.push(d);
  return d;
}

export interface Run {
  status: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], cwd?: string): Run {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd, maxBuffer: 64 << 20 });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** qemu-img, which must succeed; returns its stdout. */
export function qemuImg(args: string[], cwd?: string): string {
  const r = run('qemu-img', args, cwd);
  assert.equal(r.status, 0, `qemu-img ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** qemu-io on an image with one or more -c commands; must succeed (a failed pattern check exits 1). */
export function qemuIo(path: string, cmds: string[], format = 'qcow2'): string {
  const r = run('qemu-io', ['-f', format, ...cmds.flatMap((c) => ['-c', c]), path]);
  assert.equal(r.status, 0, `qemu-io ${cmds.join('; ')} failed: ${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/, `qemu-io ${cmds.join('; ')}: ${r.stdout}`);
  return r.stdout;
}

/** `qemu-img check`: exit 0 with no corruptions and no leaks. */
export function assertCheck(path: string): void {
  const r = run('qemu-img', ['check', '--output=json', path]);
  assert.equal(r.status, 0, `qemu-img check ${path}: exit ${r.status}\n${r.stdout}${r.stderr}`);
  const j = JSON.parse(r.stdout) as { 'check-errors': number; corruptions?: number; leaks?: number };
  assert.equal(j['check-errors'], 0);
  assert.equal(j.corruptions ?? 0, 0);
  assert.equal(j.leaks ?? 0, 0);
}

/** `qemu-img compare` of an image against a raw file: exit 0 (identical guest content). */
export function assertCompare(image: string, raw: string, format = 'qcow2'): void {
  const r = run('qemu-img', ['compare', '-f', format, '-F', 'raw', image, raw]);
  assert.equal(r.status, 0, `qemu-img compare ${image} ${raw}: exit ${r.status}\n${r.stdout}${r.stderr}`);
}

/** Extents of `qemu-img map --output=json`. */
export interface MapExtent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}
export function qemuMap(path: string): MapExtent[] {
  return JSON.parse(qemuImg(['map', '--output=json', path])) as MapExtent[];
}

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `n` bytes of the PRNG's stream. */
export function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (rand() * 256) | 0;
  return b;
}

export const KiB = 1024;
export const MiB = 1024 * 1024;
