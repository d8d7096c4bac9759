/**
 * `ferry inspect`: the sections of QEMU 7.2's own stream (the none-16M
 * vector) with their ids, versions and contents; every record with
 * --records; JSON; a stream written by a Ferry source, with its own device
 * sections; and a truncated stream, refused with the destination's text.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runMigration } from '../helpers/migration.js';
import { FERRY_MAIN, REPO_ROOT, cleanupAll, tempDir } from '../helpers/vm.js';

after(cleanupAll);

const VEC = join(REPO_ROOT, 'test/golden/streams');
const inspect = (...args: string[]) => spawnSync(process.execPath, [FERRY_MAIN, 'inspect', ...args], { encoding: 'utf8' });

describe('ferry inspect', () => {
  it('lists the sections of a QEMU 7.2 stream', () => {
    const r = inspect(join(VEC, 'none-16M.bin'));
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n').map((l) => l.trim()), [
      '0x0  header: QEVM version 3',
      "0x8  configuration: machine 'none'",
      "0x11  START section 2 'ram' instance 0 version 4: no pages [m 0x1000000]",
      "0x41  PART  section 2 'ram' instance 0 version 4: zero 4096",
      "0x9055  END   section 2 'ram' instance 0 version 4: no pages",
      "0x9067  FULL  section 0 'timer' instance 0 version 2: 24 bytes",
      "0x9097  FULL  section 4 'globalstate' instance 0 version 1: 104 bytes",
      '0x911d  EOF',
      '0x911e  vmdesc: 486 bytes of JSON',
    ]);
  });

  it('--records shows every RAM record, CONTINUE included; --desc the vmdesc; --json parses', () => {
    const r = inspect('--records', '--desc', join(VEC, 'ramonly-xbzrle-gs.bin'));
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.split('\n').map((l) => l.trim());
    assert.ok(lines.includes('mem_size m 0x1000000'));
    assert.ok(lines.includes('page m 0x0 4096 bytes'), 'the first record names its block');
    assert.ok(lines.includes('page m 0x1000 4096 bytes cont'));
    assert.ok(lines.some((l) => /^xbzrle m 0x[0-9a-f]+ \d+ bytes cont$/.test(l)), 'an XBZRLE record');
    const j = inspect('--json', join(VEC, 'none-16M.bin'));
    const recs = JSON.parse(j.stdout) as Array<{ type: string; value?: { page_size: number } }>;
    assert.equal(recs.at(-1)!.type, 'vmdesc');
    assert.equal(recs.at(-1)!.value!.page_size, 4096);
  });

  it('reads a Ferry stream with its own device sections', async () => {
    const m = await runMigration({ guest: { mem: '8M', smp: 2 }, transport: 'file', destination: null, expect: { source: 'completed' } });
    const r = inspect(m.file!);
    assert.equal(r.status, 0, r.stderr);
    for (const s of ["'ferry-serial'", "'ferry-vcpu' instance 1", "'globalstate'", "'ferry-migration'"]) {
      assert.ok(r.stdout.includes(s), `${s} in\n${r.stdout}`);
    }
  });

  it('refuses a truncated stream and a missing file with clear errors', () => {
    const dir = tempDir();
    const cut = join(dir, 'cut.bin');
    writeFileSync(cut, readFileSync(join(VEC, 'none-16M.bin')).subarray(0, 30000));
    const r = inspect(cut);
    assert.equal(r.status, 1);
    assert.equal(r.stderr, `ferry inspect: ${cut}: Unexpected end of migration stream\n`);
    const m = inspect(join(dir, 'nope.bin'));
    assert.equal(m.status, 1);
    assert.equal(m.stderr, `ferry inspect: Could not open '${join(dir, 'nope.bin')}': No such file or directory\n`);
    const u = inspect();
    assert.equal(u.status, 1);
    assert.match(u.stderr, /FILE is missing/);
  });
});
