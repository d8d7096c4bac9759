/**
 * The `compress` capability end to end (docs/spec/xbzrle.md §6): pages deflated on the
 * source's compress-threads, inflated on the destination's
 * decompress-threads. The destination must enable the capability too
 * (`-incoming defer`, migrate-set-capabilities, migrate-incoming), as QEMU
 * requires; without it the load fails with QEMU's text.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { runMigration, type Expect, type Guest, type Migration } from '../helpers/migration.js';
import { cleanupAll } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;
const TEXT: Guest = { mem: '64M', fill: 'text,seed=4' };
const RANDOM: Guest = { mem: '64M', fill: 'random,seed=6', workload: 'stress,rate=1M,seed=2' };

/**
 * Migrate `guest` (the destination started with the same arguments and
 * `-incoming defer`); by default both sides complete, the destination is
 * paused and the digests are equal.
 */
function migrate(
  guest: Guest,
  opts: { compress: boolean; dstCompress?: boolean; params?: Record<string, unknown>; expect?: Expect; after?: (m: Migration) => unknown },
): Promise<Migration> {
  return runMigration({
    tempPrefix: 'ferry-compress-',
    guest,
    destination: { fill: guest.fill, workload: guest.workload, defer: true, capabilities: (opts.dstCompress ?? opts.compress) ? ['compress'] : [] },
    capabilities: opts.compress ? ['compress'] : [],
    source: { parameters: { 'max-bandwidth': 128 * MiB, ...opts.params } },
    timeoutMs: 90000,
    expect: opts.expect,
    after: opts.after,
  });
}

describe('compress capability', { timeout: 300000 }, () => {
  it('a text guest sends far fewer bytes with compress on both sides; destination equals source', async (t) => {
    const plain = await migrate(TEXT, { compress: false });
    const plainBytes = plain.info.ram.transferred as number;

    const z = await migrate(TEXT, {
      compress: true,
      after: async ({ d }) => {
        const caps = await d.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
        assert.equal(caps.find((c) => c.capability === 'compress')?.state, true);
      },
    });
    const zBytes = z.info.ram.transferred as number;
    const ratio = zBytes / plainBytes;
    t.diagnostic(`ram.transferred: plain ${plainBytes}, compressed ${zBytes} (ratio ${ratio.toFixed(3)}); ` +
      `total-time plain ${plain.info['total-time']} ms, compressed ${z.info['total-time']} ms`);
    assert.ok(ratio < 0.6, `compressed ${zBytes} / plain ${plainBytes} = ${ratio.toFixed(3)}`);
    // compressed pages count as normal pages (2.10 has no compression statistics)
    assert.ok(z.info.ram.normal + z.info.ram.duplicate >= 16384, JSON.stringify(z.info.ram));
    assert.equal(z.info.ram.remaining, 0);
  });

  it('compress-level 0 (stored blocks) and 2 threads: completes with equal memory, no smaller than the RAM', async () => {
    const r = await migrate(TEXT, {
      compress: true,
      params: { 'compress-level': 0, 'compress-threads': 2, 'decompress-threads': 1 },
    });
    // level 0 stores: every non-zero page costs more than its 4096 bytes
    assert.ok(r.info.ram.transferred > r.info.ram.normal * 4096, JSON.stringify(r.info.ram));
  });

  it('an incompressible (random) dirtying guest still migrates correctly', async () => {
    const r = await migrate(RANDOM, { compress: true, params: { 'compress-threads': 4 } });
    assert.ok(r.info.ram.transferred > 60 * MiB, JSON.stringify(r.info.ram));
  });

  it('a destination without the capability refuses compressed pages', async () => {
    const r = await migrate({ mem: '32M', fill: 'text,seed=1' }, {
      compress: true,
      dstCompress: false,
      // whatever the source concludes; the destination fails
      expect: { source: 'ended', destination: 'failed' },
    });
    assert.match(r.dinfo!['error-desc'], /Received an unexpected compressed page/);
  });

});
