/**
 * Ferry-written streams read by QEMU 7.2:
 *  - a Ferry `migrate exec:cat > FILE` (x-qemu-compat=on) loads in QEMU with
 *    `-incoming "exec:cat FILE"`, RAM identical;
 *  - without x-qemu-compat Ferry also sends its own device sections, which
 *    QEMU rejects: "Unknown savevm section or instance 'ferry-serial' 0".
 *    `-machine ...,x-qemu-compat=on` is REQUIRED when QEMU is the destination.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { runMigration } from '../helpers/migration.js';
import { cleanupAll, waitFor } from '../helpers/vm.js';
import {
  FERRY_COMPAT_ARGS, MEM, QEMU_RAM_ARGS, QEMU_SKIP, assertSameRam, cleanupQemu, pmem, runQemu, startQemu, waitQemuMigration,
} from '../helpers/qemu.js';

after(async () => {
  await cleanupQemu();
  await cleanupAll();
});

/** Migrate a Ferry source into `exec:cat > FILE` (completed); its RAM and the file. */
async function ferryToFile(machine: string[]): Promise<{ ram: Buffer; file: string; dir: string }> {
  let ram: Buffer = Buffer.alloc(0);
  const { info, file, dir } = await runMigration({
    tempPrefix: 'ferry-qfile-',
    guest: { machine, fill: 'random,seed=11' },
    transport: 'file',
    destination: null,
    timeoutMs: 30000,
    after: async ({ src, dir }) => void (ram = await pmem(src, dir)),
  });
  // The file must hold at least every byte Ferry counted as transferred (plus the
  // vmdesc trailer). Shorter means the exec: child was killed (SIGTERM on channel
  // close) before it had drained the pipe: the saved stream is truncated.
  const size = statSync(file!).size;
  assert.ok(
    size >= info.ram.transferred,
    `exec:cat > FILE wrote ${size} bytes but Ferry transferred ${info.ram.transferred}: stream truncated (exec child killed before draining its pipe)`,
  );
  return { ram, file: file!, dir };
}

describe('Ferry streams read by QEMU 7.2', { skip: QEMU_SKIP, timeout: 150000 }, () => {
  it('x-qemu-compat=on: a stream saved to a file loads with -incoming "exec:cat FILE"', { timeout: 50000 }, async () => {
    const { ram: want, file, dir } = await ferryToFile(FERRY_COMPAT_ARGS);
    const qemu = await startQemu({ dir, args: [...QEMU_RAM_ARGS, '-incoming', `exec:cat '${file}'`] });
    const qinfo = await waitQemuMigration(qemu, undefined, 20000);
    assert.equal(qinfo.status, 'completed', `${JSON.stringify(qinfo)}\n${qemu.stderr}`);
    await waitFor(async () => (await qemu.status()) === 'running', 10000, 'QEMU running');
    assertSameRam(await qemu.ram(MEM), want, 'ferry file → qemu');
    assert.equal(qemu.stderr.trim(), '', 'QEMU loads the stream silently');
    await qemu.quit();
  });

  it('without x-qemu-compat QEMU rejects the live stream: unknown section ferry-serial', { timeout: 50000 }, async () => {
    const { info } = await runMigration({
      tempPrefix: 'ferry-qfile-',
      guest: { machine: QEMU_RAM_ARGS, fill: 'random,seed=12' },
      destination: { qemu: true, name: 'qemu', args: QEMU_RAM_ARGS },
      transport: 'tcp',
      during: async ({ d: qemu }) => {
        // QEMU's incoming load fails and QEMU exits (status 1)
        const t = setTimeout(() => qemu.kill(), 30000);
        await qemu.exited;
        clearTimeout(t);
        assert.equal(qemu.exitCode, 1, `qemu exit ${qemu.exitCode}/${qemu.exitSignal}: ${qemu.stderr}`);
        assert.match(qemu.stderr, /Unknown savevm section or instance 'ferry-serial' 0/, qemu.stderr);
        assert.match(qemu.stderr, /load of migration failed: Invalid argument/, qemu.stderr);
      },
      // whatever Ferry's source concludes, it must end (completed: the bytes were written; failed: peer closed)
      timeoutMs: 30000,
      expect: { source: 'ended', destination: null },
    });
    assert.ok(['completed', 'failed'].includes(info.status), JSON.stringify(info));
  });

  it('without x-qemu-compat a saved stream fails the same way in QEMU (and holds a ferry-serial section)', { timeout: 50000 }, async () => {
    const { file } = await ferryToFile(QEMU_RAM_ARGS);
    assert.ok(readFileSync(file).includes(Buffer.from('\x0cferry-serial', 'latin1')), 'stream names ferry-serial');
    const r = await runQemu([...QEMU_RAM_ARGS, '-incoming', `exec:cat '${file}'`], 30000);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /Unknown savevm section or instance 'ferry-serial' 0/, r.stderr);
  });
});
