/**
 * The stream vectors (test/golden/streams, each checked against QEMU 7.2)
 * replayed through Ferry's real destination with `-incoming "exec:cat FILE"`,
 * RAM compared with the gunzipped .expect image.
 *
 * (QEMU → Ferry with xbzrle and a guest dirtying RAM would need a guest
 * kernel under TCG; these vectors cover the xbzrle/compress load paths instead.)
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { loadStreamFile } from '../helpers/migration.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { MEM, VECTORS_DIR, assertSameRam, pmem, readExpect } from '../helpers/qemu.js';

after(cleanupAll);

const FERRY_DST = ['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=16M', '-S'];

function vec(name: string): string {
  return join(VECTORS_DIR, name);
}

async function load(name: string): Promise<{ status: string; ram: Buffer }> {
  const dir = tempDir('ferry-vec-');
  const { vm: dst, info } = await loadStreamFile(vec(name), { dir, args: FERRY_DST });
  assert.equal(info.status, 'completed', `${name}: ${JSON.stringify(info)}\n${dst.stderr}`);
  const r = { status: await dst.status(), ram: await pmem(dst, dir) };
  await dst.quit();
  return r;
}

describe('shared vectors through a Ferry destination', { timeout: 120000 }, () => {
  it('ramonly-plain.bin: RAM equals the expect image', { timeout: 40000 }, async () => {
    const r = await load('ramonly-plain.bin');
    assertSameRam(r.ram, readExpect('ramonly-plain.bin'), 'ramonly-plain');
    assert.equal(r.status, 'paused', 'no globalstate in the stream: -S leaves the VM paused');
  });

  it('ramonly-xbzrle-gs.bin: XBZRLE pages decode without the xbzrle capability', { timeout: 40000 }, async () => {
    const r = await load('ramonly-xbzrle-gs.bin');
    assertSameRam(r.ram, readExpect('ramonly-xbzrle-gs.bin'), 'ramonly-xbzrle-gs');
  });

  it('ramonly-compress.bin: loads with the compress capability on the destination', { timeout: 40000 }, async () => {
    const dir = tempDir('ferry-vec-');
    const { vm: dst, info } = await loadStreamFile(vec('ramonly-compress.bin'), { dir, args: FERRY_DST, capabilities: ['compress'] });
    assert.equal(info.status, 'completed', `${JSON.stringify(info)}\n${dst.stderr}`);
    assertSameRam(await pmem(dst, dir), readExpect('ramonly-compress.bin'), 'ramonly-compress');
    await dst.quit();
  });

  it('ramonly-compress.bin: without the capability the load fails as in QEMU', { timeout: 40000 }, async () => {
    const { vm: r, info } = await loadStreamFile(vec('ramonly-compress.bin'), { dir: tempDir('ferry-vec-'), args: FERRY_DST });
    assert.equal(info.status, 'failed', JSON.stringify(info));
    assert.match(`${info['error-desc'] ?? ''}\n${r.stderr}`, /Received an unexpected compressed page/);
    await r.quit();
  });

  it('none-16M.bin (written by QEMU 7.2): prelaunch from globalstate, all-zero RAM', { timeout: 40000 }, async () => {
    const r = await load('none-16M.bin');
    assert.equal(r.status, 'prelaunch');
    assert.equal(r.ram.length, MEM);
    assertSameRam(r.ram, Buffer.alloc(MEM), 'none-16M');
  });
});
