/**
 * The prefault of guest RAM (an incoming VM's background prefault,
 * -mem-prealloc): it runs on the helper threads, with the hugepage addon
 * loaded there (MADV_POPULATE_WRITE) or the atomic-touch fallback, over
 * blocks of every size, and leaves the memory resident without changing a
 * byte. Residency is read from /proc/self/status (VmRSS).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { HelperPool } from '../../src/machine/helpers.js';

const MiB = 1 << 20;
const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../../..');
const noNative = process.env.FERRY_NO_NATIVE === '1';

/**
 * Runs an ES module script in a fresh node process (with `env` added) and
 * returns what it printed: RSS figures taken there are not disturbed by
 * the memory this test process frees meanwhile.
 */
function runChild(script: string, env: Record<string, string> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-prefault-'));
  try {
    const file = join(dir, 'child.mjs');
    writeFileSync(file, script);
    return execFileSync(process.execPath, [file], { env: { ...process.env, ...env }, encoding: 'utf8' }).trim();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const distUrl = (rel: string): string => JSON.stringify(pathToFileURL(resolve(root, 'dist/src', rel)).href);
const CHILD_RSS = `import { readFileSync } from 'node:fs';
      const rss = () => Number(/VmRSS:\\s+(\\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;`;

describe('prefault', () => {
  it('the hugepage addon loads in a worker thread (it is context-aware)', { skip: noNative && 'FERRY_NO_NATIVE=1' }, async () => {
    const addon = resolve(root, 'native/hugepage/index.cjs');
    const w = new Worker(`const hp = require(${JSON.stringify(addon)}); require('node:worker_threads').parentPort.postMessage(hp.available ? 'ok' : String(hp.loadError));`, { eval: true });
    const msg = await new Promise((res, rej) => {
      w.once('message', res);
      w.once('error', rej);
    });
    await w.terminate();
    assert.equal(msg, 'ok');
    assert.equal(createRequire(import.meta.url)(addon).available, true);
  });

  /** A child that creates a Machine with `cfg`, runs `body` (it sets `grown`), prints grown and destroys it. */
  const machineChild = (cfg: string, body: string): number =>
    Number(runChild(`
      import { Machine } from ${distUrl('machine/index.js')};
      ${CHILD_RSS}
      const MiB = 2 ** 20;
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      const before = rss();
      const m = await Machine.create(${cfg});
      let grown = rss() - before;
      ${body}
      console.log(grown);
      await m.destroy();`));

  it('Machine with prealloc has all of its RAM resident when create() returns, contents unchanged', () => {
    const grown = machineChild('{ ramSize: 192 * MiB, smp: 1, startPaused: true, prealloc: true }',
      `if (!m.ram[0].bytes.every((v) => v === 0)) throw new Error('RAM changed');`);
    assert.ok(grown >= 180 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB, expected about 192`);
  });

  it('an incoming Machine without prealloc does not wait for the prefault', () => {
    // create() returned before the helpers could fault in 1 GiB (it takes 0.1-3 s)
    const grown = machineChild('{ ramSize: 1024 * MiB, smp: 1, incoming: true }', '');
    assert.ok(grown < 900 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB before create() returned`);
  });

  it('the background prefault stops after its current range once the incoming migration has loaded', () => {
    // once the range it was on is done (64 MiB, well under 0.5 s), RSS stays put
    const grown = machineChild('{ ramSize: 1024 * MiB, smp: 1, incoming: true }',
      'm.endBackgroundPrefault(); await sleep(500); const settled = rss(); await sleep(1500); grown = rss() - settled;');
    assert.ok(grown < 32 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB in the 1.5 s after the stop`);
  });

  it('without the stop, the background prefault faults all of RAM in', () => {
    const grown = machineChild('{ ramSize: 512 * MiB, smp: 1, incoming: true }',
      'for (let i = 0; i < 100 && grown < 480 * MiB; i++) { await sleep(100); grown = rss() - before; }');
    assert.ok(grown >= 480 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB in 10 s`);
  });

  it('the background prefault goes from the top down and stops where it meets what the loader has written', () => {
    const out = runChild(`
      import { GuestRam } from ${distUrl('machine/ram.js')};
      ${CHILD_RSS}
      const MiB = 2 ** 20;
      const ram = new GuestRam(512 * MiB, 'pc.ram');
      // the loader has written one page at 300 MiB: the prefault faults 448-512, 384-448 and 320-384 MiB
      // (not the range of 256-320 MiB, nor anything below it)
      ram.blocks[0].touched[(300 * MiB) / 4096 / 32] = 1;
      const before = rss();
      ram.prefaultInBackground();
      await new Promise((r) => setTimeout(r, 2500));
      console.log(rss() - before);
      await ram.close();`);
    const grown = Number(out);
    assert.ok(grown >= 188 * MiB && grown < 250 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB, expected about 192`);
  });

  it('the background prefault skips the ranges the loader has already written', () => {
    const out = runChild(`
      import { GuestRam } from ${distUrl('machine/ram.js')};
      ${CHILD_RSS}
      const MiB = 2 ** 20;
      const ram = new GuestRam(512 * MiB, 'pc.ram');
      // the loader wrote the first 448 MiB (touched bits), not the last 64 MiB
      ram.blocks[0].touched.fill(0xffffffff, 0, (448 * MiB) / 4096 / 32);
      const before = rss();
      ram.prefaultInBackground();
      await new Promise((r) => setTimeout(r, 2000));
      console.log(rss() - before);
      await ram.close();`);
    const grown = Number(out);
    // the last range only (and the helper worker's own memory), not 512 MiB
    assert.ok(grown >= 60 * MiB && grown < 200 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB`);
  });

  it('a range above 2 GiB in a block of more than 2 GiB is faulted in, with the addon and with the fallback', async () => {
    const script = `
      import { HelperPool } from ${distUrl('machine/helpers.js')};
      ${CHILD_RSS}
      const buf = new SharedArrayBuffer(2 ** 31 + 64 * 2 ** 20);
      const pool = new HelperPool(2);
      await pool.run({ op: 'prefault', buf, offset: 0, length: 4096 }); // spawn the worker first
      const before = rss();
      await pool.run({ op: 'prefault', buf, offset: 2 ** 31, length: 64 * 2 ** 20 });
      console.log(rss() - before);
      await pool.close();`;
    for (const env of noNative ? ['1'] : ['0', '1']) {
      const grown = Number(runChild(script, { FERRY_NO_NATIVE: env }));
      assert.ok(grown >= 60 * MiB, `FERRY_NO_NATIVE=${env}: RSS grew by ${(grown / MiB).toFixed(1)} MiB, expected 64`);
    }
  });

  it('a prefault task keeps the bytes the loader writes meanwhile', async () => {
    const buf = new SharedArrayBuffer(64 * MiB);
    const bytes = new Uint8Array(buf);
    const pool = new HelperPool(1);
    try {
      const task = pool.run({ op: 'prefault', buf, offset: 0, length: buf.byteLength });
      for (let i = 0; i < bytes.length; i += 4096) bytes[i] = (i >>> 12) & 0xff || 1;
      await task;
      for (let i = 0; i < bytes.length; i += 4096) assert.equal(bytes[i], (i >>> 12) & 0xff || 1);
    } finally {
      await pool.close();
    }
  });
});
