/**
 * The `xbzrle` capability end to end (docs/spec/xbzrle.md §3, §5): a guest with sparse
 * writes migrates with and without XBZRLE — the passes after the first cost
 * far fewer bytes with it, and the destination equals the source both ways —
 * and a corrupt XBZRLE record fails a load cleanly.
 *
 * As in QEMU, nothing is cached during the bulk stage: the second pass finds
 * every page missing from the cache and sends it in full (and caches it);
 * deltas start with the third pass. The working set (8 MiB) is dirtied
 * completely during the 2 s bulk pass, so from the third pass on nearly every
 * dirty page is a cache hit. downtime-limit 0 keeps the source iterating
 * until the test lifts the limits.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { xbzrleDecode } from '../../src/migration/codec/xbzrle-codec.js';
import { guestArgs, loadStreamFile, runMigration, type Guest } from '../helpers/migration.js';
import { writeStream } from '../helpers/streams.js';
import { cleanupAll, waitFor } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;
const GUEST: Guest = { mem: '64M', fill: 'random,seed=5', workload: 'stress,rate=16M,write=8,wss=8M,seed=3' };

interface Sample {
  t: number;
  sync: number;
  transferred: number;
  status: string;
  xbzrle: Record<string, number> | undefined;
}

/** Window over which the steady state after the miss pass is measured. */
const WINDOW_MS = 3000;

/**
 * Migrate the guest with or without XBZRLE. The bulk pass runs at 32 MiB/s;
 * then max-bandwidth drops to 8 MiB/s, below the guest's dirty rate over its
 * working set, so that without XBZRLE the passes go on at full link speed.
 * From the first sample after the third sync (bulk pass and miss pass over)
 * the bytes sent during WINDOW_MS are measured; then the limits are lifted
 * so the migration completes.
 */
async function migrate(xbzrle: boolean) {
  const samples: Sample[] = [];
  let first: Sample | undefined; // first sample after the bulk pass
  let a: Sample | undefined; // start of the window
  let b: Sample | undefined; // end of the window
  let info: Record<string, any> = {};
  // then: completed on both sides, 'destination RAM equals the source' (digests)
  await runMigration({
    tempPrefix: 'ferry-xbzrle-',
    guest: GUEST,
    destination: { ...GUEST },
    capabilities: xbzrle ? ['xbzrle'] : [],
    source: { parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 0 } },
    during: async ({ src }) => {
      const t0 = Date.now();
      let slowed = false;
      let released = false;
      for (;;) {
        info = await src.execute<Record<string, any>>('query-migrate');
        if (info.ram) {
          const s: Sample = { t: Date.now() - t0, sync: info.ram['dirty-sync-count'], transferred: info.ram.transferred, status: info.status, xbzrle: info['xbzrle-cache'] };
          samples.push(s);
          if (!first && s.sync >= 2) first = s;
          if (!a && s.sync >= 3) a = s;
          if (a && !b && (s.t - a.t >= WINDOW_MS || s.status === 'completed')) b = s;
        }
        if (['completed', 'failed', 'cancelled'].includes(info.status)) break;
        if (first && !slowed) {
          slowed = true;
          await src.execute('migrate-set-parameters', { 'max-bandwidth': 8 * MiB });
        }
        if (!released && (b || Date.now() - t0 > 30000)) {
          released = true;
          await src.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'downtime-limit': 300 });
        }
        if (Date.now() - t0 > 90000) throw new Error('migration did not end');
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.equal(info.status, 'completed', JSON.stringify(info));
    },
  });
  assert.ok(first && a && b, `the migration went through the bulk and miss passes: ${JSON.stringify(samples.slice(-3))}`);
  const end = samples.at(-1)!;
  return {
    info,
    samples,
    /** bytes from the end of the bulk pass to the end */
    afterFirst: end.transferred - first.transferred,
    /** bytes during the window after the miss pass, and its length */
    window: { bytes: b.transferred - a.transferred, ms: b.t - a.t, syncs: b.sync - a.sync },
  };
}

describe('xbzrle capability', () => {
  it('sparse writes: far fewer bytes after the first pass; xbzrle-cache stats; digests equal with and without', { timeout: 180000 }, async () => {
    const plain = await migrate(false);
    const xb = await migrate(true);
    const report = {
      plain: { afterFirst: plain.afterFirst, window: plain.window, ram: plain.info.ram },
      xbzrle: { afterFirst: xb.afterFirst, window: xb.window, ram: xb.info.ram, cache: xb.info['xbzrle-cache'] },
    };
    const ctx = JSON.stringify(report);

    // no xbzrle-cache without the capability, in any state
    assert.ok(plain.samples.every((s) => s.xbzrle === undefined), 'plain: no xbzrle-cache');
    assert.equal(plain.info['xbzrle-cache'], undefined);
    // with it: present while active and when completed
    assert.ok(xb.samples.filter((s) => s.status === 'active').every((s) => s.xbzrle !== undefined), 'xbzrle-cache while active');
    const c = xb.info['xbzrle-cache'];
    assert.ok(c, ctx);
    assert.equal(c['cache-size'], 64 * MiB);
    assert.ok(c.pages > 0, ctx);
    assert.ok(c.bytes > 0 && c.bytes < c.pages * 200, `deltas of 8-byte writes are small: ${ctx}`);
    assert.ok(c['cache-miss'] >= 1000, `the second pass misses (nothing cached in the bulk stage): ${ctx}`);
    assert.ok(c['cache-miss-rate'] >= 0 && c['cache-miss-rate'] <= 1, ctx);
    assert.ok(c.overflow < c.pages / 10, ctx);

    // after the miss pass: without XBZRLE the link stays busy resending pages,
    // with it the same dirtying costs small deltas
    assert.ok(plain.window.bytes > 4 * MiB, ctx);
    assert.ok(xb.window.bytes * 10 < plain.window.bytes, `XBZRLE window bytes: ${ctx}`);
    // and all passes after the first together cost far less (the miss pass included)
    assert.ok(xb.afterFirst * 3 < plain.afterFirst, ctx);
    console.log(ctx);
  });

  it('migrate-set-cache-size during the migration resizes the running cache', { timeout: 120000 }, async () => {
    const guest: Guest = { mem: '32M', fill: 'random,seed=7', workload: 'stress,rate=16M,write=8,wss=4M,seed=5' };
    // then: completed on both sides, digests equal
    const { info } = await runMigration({
      tempPrefix: 'ferry-xbzrle-resize-',
      guest,
      destination: { ...guest },
      capabilities: ['xbzrle'],
      source: { parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 0 } },
      before: async ({ src }) => {
        await src.execute('migrate-set-cache-size', { value: 32 * MiB });
        // before any migration with the capability on: zeros, the configured size
        assert.deepEqual((await src.execute<Record<string, any>>('query-migrate')), {});
      },
      during: async ({ src }) => {
        const during = (await waitFor(async () => {
          const i = await src.execute<Record<string, any>>('query-migrate');
          if (['completed', 'failed', 'cancelled'].includes(i.status)) return i;
          return i.status === 'active' && i.ram['dirty-sync-count'] >= 2 ? i : null;
        }, 30000, 'the end of the bulk pass'))!;
        assert.equal(during.status, 'active', JSON.stringify(during));
        assert.equal(during['xbzrle-cache']['cache-size'], 32 * MiB);
        await src.execute('migrate-set-cache-size', { value: (5 * MiB) + 1 });
        assert.equal(await src.execute('query-migrate-cache-size'), 4 * MiB);
        // downtime-limit 0 keeps it running: xbzrle-cache.cache-size is the running cache's own size
        const now = await src.execute<Record<string, any>>('query-migrate');
        assert.equal(now.status, 'active', JSON.stringify(now));
        assert.equal(now['xbzrle-cache']['cache-size'], 4 * MiB, 'the running cache was resized');
        await src.execute('migrate-set-parameters', { 'downtime-limit': 300 });
      },
      after: async ({ src }) => {
        // the stats follow the capability: off -> gone from query-migrate
        await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: false }] });
        assert.equal((await src.execute<Record<string, any>>('query-migrate'))['xbzrle-cache'], undefined);
      },
    });
    assert.equal(info['xbzrle-cache']['cache-size'], 4 * MiB);
  });

  it('a corrupt XBZRLE record fails the load with error-desc; the guest stays in inmigrate', { timeout: 120000 }, async () => {
    const guest: Guest = { mem: '32M', fill: 'random,seed=6', workload: 'stress,rate=16M,write=8,wss=4M,seed=4' };
    // a real xbzrle stream, into a file
    let digest = '';
    const { dir, file, info } = await runMigration({
      tempPrefix: 'ferry-xbzrle-bad-',
      guest,
      capabilities: ['xbzrle'],
      source: { parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 0 } },
      transport: 'file',
      destination: null,
      after: async ({ src }) => void (digest = await src.digest()),
    });
    assert.ok(info['xbzrle-cache'].pages > 0, JSON.stringify(info));
    const bytes = readFileSync(file!);

    const load = async (name: string, b: Buffer) => {
      const f = writeStream(dir, name, b);
      return loadStreamFile(f, { dir, name, args: [...guestArgs(guest), '-S'] });
    };
    // control: the captured stream loads and gives the source's RAM
    const ok = await load('good', bytes);
    assert.equal(ok.info.status, 'completed', JSON.stringify(ok.info));
    assert.equal(await ok.vm.digest(), digest);
    await ok.vm.quit();

    // find XBZRLE records: header word (page offset | XBZRLE | CONTINUE), 0x01,
    // be16 length, a delta that decodes, then another well-formed RAM record
    const found: number[] = [];
    const page = new Uint8Array(4096);
    for (let p = 0; p + 12 < bytes.length && found.length < 4; p++) {
      if (bytes.readUInt32BE(p) !== 0 || (bytes.readUInt32BE(p + 4) & 0xfff) !== 0x60 || bytes[p + 8] !== 0x01) continue;
      const len = bytes.readUInt16BE(p + 9);
      if (len < 3 || len > 4096 || p + 11 + len + 8 > bytes.length) continue;
      if (xbzrleDecode(bytes, p + 11, len, page) < 0) continue;
      const next = bytes.readUInt32BE(p + 11 + len + 4) & 0xfff;
      if (bytes.readUInt32BE(p + 11 + len) !== 0 || ![0x10, 0x22, 0x28, 0x60, 0x02, 0x08, 0x40].includes(next)) continue;
      found.push(p);
    }
    assert.ok(found.length > 0, 'the capture holds XBZRLE records');
    // a three-byte length (second byte with its top bit set) is malformed
    const bad = Buffer.from(bytes);
    const at = found[0]!;
    bad[at + 11] = 0x80;
    bad[at + 12] = 0x80;
    const r = await load('bad', bad);
    assert.equal(r.info.status, 'failed', JSON.stringify(r.info));
    assert.match(r.info['error-desc'], /Failed to load XBZRLE page - decode error!/);
    assert.equal(await r.vm.status(), 'inmigrate');
    assert.equal(r.vm.exitCode, null);
    // a wrong encoding id
    const bad2 = Buffer.from(bytes);
    bad2[at + 8] = 0x02;
    const r2 = await load('bad2', bad2);
    assert.equal(r2.info.status, 'failed', JSON.stringify(r2.info));
    assert.match(r2.info['error-desc'], /Failed to load XBZRLE page - wrong compression!/);
    assert.equal(await r2.vm.status(), 'inmigrate');
    await r.vm.quit();
    await r2.vm.quit();
  });
});
