/**
 * Findings of the reliability suite, each kept as a small regression test.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { HelperPool } from '../../src/machine/helpers.js';
import { inspectStream } from '../../src/migration/inspect.js';
import { Pair } from '../helpers/pair.js';
import { shq } from '../helpers/vm.js';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

const guest = { ramSize: 4 << 20, smp: 1, fill: { kind: 'random' as const, seed: 9 }, workload: { kind: 'idle' as const } };

/** Rejects after `ms`: a hang is a failure with a text, not a test runner timeout. */
function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`hung: ${what} after ${ms} ms`)), ms)))]).finally(() => clearTimeout(t));
}

describe('reliability findings', () => {
  it('a helper pool closed while its worker still loads its modules leaves no descriptor open (the matrix saw dist/src/base/native.js and machine/workload.js left open)', async () => {
    const open = (): string[] => readdirSync('/proc/self/fd').flatMap((f) => {
      try {
        const l = readlinkSync(`/proc/self/fd/${f}`);
        return l.includes('/dist/') ? [l] : [];
      } catch {
        return [];
      }
    });
    const before = open();
    for (let i = 0; i < 20; i++) {
      const pool = new HelperPool(1);
      // spawns the worker; close() comes at staggered moments of its start-up
      pool.run({ op: 'digest', buf: new SharedArrayBuffer(1 << 16), offset: 0, length: 1 << 16 }).catch(() => undefined);
      await new Promise((r) => setTimeout(r, i * 3));
      await pool.close();
    }
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(open(), before, 'module files left open by terminated workers');
  });

  it('an exec: forwarder that exits non-zero after the last byte (cat > FILE on a full disk) fails the migration; the source runs on', async () => {
    // the matrix's completion × disk-full: the source said completed while `cat` had failed to write the tail
    const p = await Pair.create({ guest, noDestination: true, uri: () => 'exec:cat > /dev/null; exit 1' });
    pairs.push(p);
    const before = (await p.src.machine.digest()).digest;
    p.src.source.start(p.uri);
    await p.src.source.whenIdle();
    assert.equal(p.src.source.status, 'failed', JSON.stringify(p.src.source.info()));
    assert.match(p.src.source.info()['error-desc']!, /exited with status 1/);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.digest()).digest, before);
  });

  it('return-path to exec:cat > FILE: the source ends the command\'s input after the last byte, and fails on the end of its output without a SHUT (QEMU 7.2 waits for ever)', async () => {
    // before the fix the source waited for a SHUT while `cat` waited for more input
    const p = await Pair.create({ guest, caps: ['return-path'], noDestination: true, uri: (dir) => `exec:cat > ${shq(join(dir, 'state'))}` });
    pairs.push(p);
    const before = (await p.src.machine.digest()).digest;
    p.src.source.start(p.uri);
    await bounded(p.src.source.whenIdle(), 10000, 'the source waiting for a SHUT from a file');
    const info = p.src.source.info();
    assert.equal(p.src.source.status, 'failed', JSON.stringify(info));
    assert.match(info['error-desc']!, /return path/i, info['error-desc']);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.digest()).digest, before);
    // the file got the whole stream (the end of it is what let `cat` finish)
    const { records } = await inspectStream(readFileSync(join(p.dir, 'state')));
    assert.ok(records.at(-1)?.type === 'vmdesc' && records.some((r) => r.type === 'eof'), 'the stream in the file is whole: EOF and the vmdesc');
  });

  it('return-path to exec: with a full disk (the command fails after the last byte): failed with its exit status, the source runs on', async () => {
    const p = await Pair.create({ guest, caps: ['return-path'], noDestination: true, uri: () => 'exec:cat > /dev/null; exit 1' });
    pairs.push(p);
    const before = (await p.src.machine.digest()).digest;
    p.src.source.start(p.uri);
    await bounded(p.src.source.whenIdle(), 10000, 'the source waiting for a SHUT from a failed command');
    assert.equal(p.src.source.status, 'failed', JSON.stringify(p.src.source.info()));
    assert.match(p.src.source.info()['error-desc']!, /exited with status 1/);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal((await p.src.machine.digest()).digest, before);
  });

  it('return-path through an exec: forwarder to a real destination still completes (the forwarder passes the end of input on and the SHUT back)', async () => {
    const p = await Pair.create({ guest, caps: ['return-path'] });
    pairs.push(p);
    const path = p.uri.slice('unix:'.length);
    const hasSocat = spawnSync('sh', ['-c', 'command -v socat']).status === 0;
    // socat's -t: how long it keeps the return direction open after the end of its input
    const pipe = hasSocat
      ? `socat -t 10 - UNIX-CONNECT:${shq(path)}`
      : `${shq(process.execPath)} -e ${shq(`const s=require('net').connect({path:process.argv[1],allowHalfOpen:true});process.stdin.pipe(s);s.pipe(process.stdout);`)} ${shq(path)}`;
    const digest = (await p.src.machine.digest()).digest;
    p.src.source.start(`exec:${pipe}`);
    await bounded(p.src.source.whenIdle(), 15000, 'the migration through the forwarder');
    await p.dst!.destination.whenDone();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal(p.dst!.destination.status, 'completed');
    assert.equal((await p.dst!.machine.digest()).digest, digest);
  });
});
