/**
 * `ferry vm -m 5G`: RAM above 4 GiB, cut into 2 GiB blocks, listed by
 * x-query-memory-digest. Alone in its file: hashing 5 GiB takes a while
 * (about 10-60 s depending on the load of the machine).
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, startVm } from '../helpers/vm.js';

after(cleanupAll);

describe('large guest RAM', () => {
  it('-m 5G works: blocks listed by x-query-memory-digest', async () => {
    const vm = await startVm({ args: ['-m', '5G'] });
    assert.equal(await vm.status(), 'running');
    const dg = await vm.execute<{ digest: string; blocks: { name: string; size: number; digest: string }[] }>('x-query-memory-digest');
    const total = dg.blocks.reduce((s, b) => s + b.size, 0);
    assert.equal(total, 5 * 1024 ** 3);
    assert.ok(dg.blocks.length >= 3, `5 GiB is cut in 2 GiB blocks: ${JSON.stringify(dg.blocks.map((b) => b.size))}`);
    assert.equal(new Set(dg.blocks.map((b) => b.name)).size, dg.blocks.length);
    for (const b of dg.blocks) assert.match(b.digest, /^[0-9a-f]{64}$/);
    // the last byte of guest RAM is readable
    const file = join(vm.dir, 'tail.bin');
    await vm.execute('pmemsave', { val: 5 * 1024 ** 3 - 4096, size: 4096, filename: file });
    assert.equal(statSync(file).size, 4096);
    await vm.quit();
  });
});
