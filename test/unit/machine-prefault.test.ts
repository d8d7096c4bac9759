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
import { after, describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { HelperPool } from '../../src/machine/helpers.js';
import { Machine } from '../../src/machine/index.js';
import { GuestRam } from '../../src/machine/ram.js';

const MiB = 1 << 20;
const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../../..');
const noNative = process.env.FERRY_NO_NATIVE === '1';

function rssBytes(): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return Number(m![1]) * 1024;
}

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

  it('Machine with prealloc has all of its RAM resident when create() returns, contents unchanged', async () => {
    const before = rssBytes();
    const m = await Machine.create({ ramSize: 192 * MiB, smp: 1, startPaused: true, prealloc: true });
    try {
      const grown = rssBytes() - before;
      assert.ok(grown >= 180 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB, expected about 192`);
      assert.ok(m.ram[0]!.bytes.every((v) => v === 0));
    } finally {
      await m.destroy();
    }
  });

  it('an incoming Machine without prealloc does not wait for the prefault', async () => {
    const before = rssBytes();
    const m = await Machine.create({ ramSize: 1024 * MiB, smp: 1, incoming: true });
    try {
      // create() returned before the helpers could fault in 1 GiB (it takes 0.1-3 s)
      const grown = rssBytes() - before;
      assert.ok(grown < 900 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB before create() returned`);
    } finally {
      await m.destroy();
    }
  });

  it('the background prefault stops after its current range once the stream starts', async () => {
    const before = rssBytes();
    const m = await Machine.create({ ramSize: 1024 * MiB, smp: 1, incoming: true });
    try {
      m.stopBackgroundPrefault();
      await new Promise((r) => setTimeout(r, 1500));
      const grown = rssBytes() - before;
      // at most the range it was on (64 MiB) and the workers' own memory
      assert.ok(grown < 256 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB after the stop`);
    } finally {
      await m.destroy();
    }
  });

  it('without the stop, the background prefault faults all of RAM in', async () => {
    const before = rssBytes();
    const m = await Machine.create({ ramSize: 512 * MiB, smp: 1, incoming: true });
    try {
      let grown = 0;
      for (let i = 0; i < 100 && grown < 480 * MiB; i++) {
        await new Promise((r) => setTimeout(r, 100));
        grown = rssBytes() - before;
      }
      assert.ok(grown >= 480 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB in 10 s`);
    } finally {
      await m.destroy();
    }
  });

  it('the background prefault skips the ranges the loader has already written', async () => {
    const ram = new GuestRam(512 * MiB, 'pc.ram');
    try {
      const b = ram.blocks[0]!;
      // the loader wrote the first 448 MiB (touched bits), not the last 64 MiB
      b.touched.fill(0xffffffff, 0, (448 * MiB) / 4096 / 32);
      const before = rssBytes();
      ram.prefaultInBackground();
      let grown = 0;
      for (let i = 0; i < 50 && grown < 60 * MiB; i++) {
        await new Promise((r) => setTimeout(r, 100));
        grown = rssBytes() - before;
      }
      await new Promise((r) => setTimeout(r, 500));
      grown = rssBytes() - before;
      // the last range only (and the helper worker's own memory), not 512 MiB
      assert.ok(grown >= 60 * MiB && grown < 200 * MiB, `RSS grew by ${(grown / MiB).toFixed(0)} MiB`);
    } finally {
      await ram.close();
    }
  });

  it('a range above 2 GiB in a block of more than 2 GiB is faulted in, with the addon and with the fallback', async () => {
    const script = `
      import { HelperPool } from ${JSON.stringify(pathToFileURL(resolve(root, 'dist/src/machine/helpers.js')).href)};
      import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
      const rss = () => Number(/VmRSS:\\s+(\\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024;
      const buf = new SharedArrayBuffer(2 ** 31 + 64 * 2 ** 20);
      const pool = new HelperPool(2);
      await pool.run({ op: 'prefault', buf, offset: 0, length: 4096 }); // spawn the worker first
      const before = rss();
      await pool.run({ op: 'prefault', buf, offset: 2 ** 31, length: 64 * 2 ** 20 });
      console.log(rss() - before);
      await pool.close();`;
    const dir = mkdtempSync(join(tmpdir(), 'ferry-prefault-'));
    const file = join(dir, 'prefault.mjs');
    writeFileSync(file, script);
    after(() => rmSync(dir, { recursive: true, force: true }));
    for (const env of noNative ? ['1'] : ['0', '1']) {
      const out = execFileSync(process.execPath, [file], { env: { ...process.env, FERRY_NO_NATIVE: env }, encoding: 'utf8' });
      const grown = Number(out.trim());
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
