/**
 * The `compress` capability end to end (xbzrle.md §6): pages deflated on the
 * source's compress-threads, inflated on the destination's
 * decompress-threads. The destination must enable the capability too
 * (`-incoming defer`, migrate-set-capabilities, migrate-incoming), as QEMU
 * requires; without it the load fails with QEMU's text.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { cleanupAll, startVm, tempDir, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const MiB = 1 << 20;
const TEXT = ['-m', '64M', '-fill', 'text,seed=4'];
const RANDOM = ['-m', '64M', '-fill', 'random,seed=6', '-workload', 'stress,rate=1M,seed=2'];

interface Run {
  info: Record<string, any>;
  src: VmHandle;
  dst: VmHandle;
}

async function migrate(guest: string[], opts: { compress: boolean; dstCompress?: boolean; params?: Record<string, unknown> }): Promise<Run> {
  const dir = tempDir('ferry-compress-');
  const uri = `unix:${join(dir, 'mig.sock')}`;
  const src = await startVm({ dir, name: 'src', args: guest });
  const dst = await startVm({ dir, name: 'dst', args: [...guest, '-S', '-incoming', 'defer'] });
  const caps = (on: boolean) => ({ capabilities: [{ capability: 'compress', state: on }] });
  if (opts.dstCompress ?? opts.compress) await dst.execute('migrate-set-capabilities', caps(true));
  await dst.execute('migrate-incoming', { uri });
  if (opts.compress) await src.execute('migrate-set-capabilities', caps(true));
  await src.execute('migrate-set-parameters', { 'max-bandwidth': 128 * MiB, ...opts.params });
  await src.execute('migrate', { uri });
  const info = await waitMigration(src, undefined, 90000);
  return { info, src, dst };
}

async function finish(r: Run): Promise<void> {
  await r.src.quit();
  await r.dst.quit();
}

describe('compress capability', { timeout: 300000 }, () => {
  it('a text guest sends far fewer bytes with compress on both sides; destination equals source', async (t) => {
    const plain = await migrate(TEXT, { compress: false });
    assert.equal(plain.info.status, 'completed', JSON.stringify(plain.info));
    const plainBytes = plain.info.ram.transferred as number;
    await finish(plain);

    const z = await migrate(TEXT, { compress: true });
    assert.equal(z.info.status, 'completed', `${JSON.stringify(z.info)}\n${z.src.stderr}`);
    const dinfo = await waitMigration(z.dst);
    assert.equal(dinfo.status, 'completed', `${JSON.stringify(dinfo)}\n${z.dst.stderr}`);
    assert.equal(await z.dst.digest(), await z.src.digest());
    const zBytes = z.info.ram.transferred as number;
    const ratio = zBytes / plainBytes;
    t.diagnostic(`ram.transferred: plain ${plainBytes}, compressed ${zBytes} (ratio ${ratio.toFixed(3)}); ` +
      `total-time plain ${plain.info['total-time']} ms, compressed ${z.info['total-time']} ms`);
    assert.ok(ratio < 0.6, `compressed ${zBytes} / plain ${plainBytes} = ${ratio.toFixed(3)}`);
    // compressed pages count as normal pages (2.10 has no compression statistics)
    assert.ok(z.info.ram.normal + z.info.ram.duplicate >= 16384, JSON.stringify(z.info.ram));
    assert.equal(z.info.ram.remaining, 0);
    const caps = await z.dst.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    assert.equal(caps.find((c) => c.capability === 'compress')?.state, true);
    await finish(z);
  });

  it('compress-level 0 (stored blocks) and 2 threads: completes with equal memory, no smaller than the RAM', async () => {
    const r = await migrate(TEXT, {
      compress: true,
      params: { 'compress-level': 0, 'compress-threads': 2, 'decompress-threads': 1 },
    });
    assert.equal(r.info.status, 'completed', JSON.stringify(r.info));
    assert.equal((await waitMigration(r.dst)).status, 'completed');
    assert.equal(await r.dst.digest(), await r.src.digest());
    // level 0 stores: every non-zero page costs more than its 4096 bytes
    assert.ok(r.info.ram.transferred > r.info.ram.normal * 4096, JSON.stringify(r.info.ram));
    await finish(r);
  });

  it('an incompressible (random) dirtying guest still migrates correctly', async () => {
    const r = await migrate(RANDOM, { compress: true, params: { 'compress-threads': 4 } });
    assert.equal(r.info.status, 'completed', JSON.stringify(r.info));
    assert.equal((await waitMigration(r.dst)).status, 'completed');
    assert.equal(await r.dst.digest(), await r.src.digest());
    assert.ok(r.info.ram.transferred > 60 * MiB, JSON.stringify(r.info.ram));
    await finish(r);
  });

  it('a destination without the capability refuses compressed pages', async () => {
    const r = await migrate(['-m', '32M', '-fill', 'text,seed=1'], { compress: true, dstCompress: false });
    const dinfo = await waitMigration(r.dst);
    assert.equal(dinfo.status, 'failed');
    assert.match(dinfo['error-desc'], /Received an unexpected compressed page/);
    await finish(r);
  });

});
