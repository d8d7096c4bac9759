/**
 * Faults injected through the channel wrapper seam on an in-process pair:
 * a stream cut at several offsets or with a structural byte flipped fails
 * the destination with a stream error (it never runs), the source fails
 * and runs on with its memory, and a clean migration afterwards succeeds.
 * A loader that crashes (TypeError) is told from one that rejects its
 * input by the error's kind.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import type { SectionType } from '../../src/migration/index.js';
import { ChannelError } from '../../src/migration/channel/index.js';
import { MigrationStreamError } from '../../src/migration/wire/errors.js';
import { faultyInput, type Fault } from '../helpers/fault-channel.js';
import { Pair } from '../helpers/pair.js';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});

const guest = { ramSize: 4 << 20, smp: 1, fill: { kind: 'random' as const, seed: 4 }, workload: { kind: 'idle' as const } };

async function faulty(fault: Fault, caps: ('return-path')[] = []): Promise<{ p: Pair; before: string }> {
  const p = await Pair.create({ guest, caps, paused: true, wrapDestination: faultyInput(fault) });
  pairs.push(p);
  const before = (await p.src.machine.digest()).digest;
  await p.migrate();
  return { p, before };
}

async function recovers(p: Pair, before: string): Promise<void> {
  assert.equal(p.src.source.status, 'failed', JSON.stringify(p.src.source.info()));
  assert.equal(p.src.machine.runState, 'running');
  assert.equal((await p.src.machine.digest()).digest, before);
  assert.equal(p.dst!.destination.status, 'failed');
  assert.equal(p.dst!.machine.runState, 'inmigrate', 'the destination never runs');
  // a clean migration afterwards
  const q = await Pair.create({ guest, paused: true });
  pairs.push(q);
  await q.migrate();
  assert.equal(q.src.source.status, 'completed');
}

describe('faults through the channel wrapper', () => {
  // Near the end of the stream only the return path tells the source that the
  // destination failed (without it, the source may have written its last byte
  // and completed: QEMU's precopy has the same blind spot), so those cuts run
  // with it; early cuts fail the source's writes either way.
  for (const [at, caps] of [[3, []], [17, []], [60, []], [5000, []], [1 << 20, ['return-path']], [(4 << 20) + 100, ['return-path']]] as const) {
    it(`a stream cut after ${at} bytes fails the destination with a stream error${caps.length ? ' (return-path)' : ''}`, async () => {
      const { p, before } = await faulty({ truncateAt: at }, [...caps]);
      const err = p.dst!.destination.current!.error!;
      assert.equal(err.kind, 'stream', err.message);
      assert.equal(err.phase, 'load');
      assert.match(p.dst!.destination.info()['error-desc']!, /^load of migration failed: /);
      await recovers(p, before);
    });
  }

  it('a flipped magic byte: "Not a migration stream"', async () => {
    const { p, before } = await faulty({ flipAt: 0, mask: 0x01 });
    assert.equal(p.dst!.destination.info()['error-desc'], 'load of migration failed: Not a migration stream');
    await recovers(p, before);
  });

  it('a flipped section type byte (the first after the configuration): "Unknown savevm section type"', async () => {
    // header 8 bytes, configuration: type, be32 length, "none" = 9 bytes
    const { p, before } = await faulty({ flipAt: 17, mask: 0x40 });
    assert.equal(p.dst!.destination.info()['error-desc'], 'load of migration failed: Unknown savevm section type 65');
    await recovers(p, before);
  });

  it('with a return path, the destination says SHUT 1 and the source fails at once', async () => {
    const { p, before } = await faulty({ truncateAt: 200_000 }, ['return-path']);
    const desc = p.src.source.info()['error-desc']!;
    assert.ok(/SHUT 1|Unable to|Broken pipe|reset/.test(desc), desc);
    await recovers(p, before);
  });
});

describe('a wrapper that fails (a handshake that does not happen)', () => {
  it('on the source: the migration fails with its error, the channel under it is closed, the source runs on', async () => {
    let inner: { closed: boolean } | undefined;
    const p = await Pair.create({
      guest,
      wrapSource: (ch) => {
        inner = ch;
        throw new ChannelError('TLS handshake failed: test', 'EPROTO');
      },
    });
    pairs.push(p);
    await p.migrate();
    assert.deepEqual(p.src.source.info(), { status: 'failed', 'error-desc': 'TLS handshake failed: test' });
    assert.equal(inner?.closed, true);
    assert.equal(p.src.machine.runState, 'running');
    assert.equal(p.dst!.destination.status, 'failed', 'the destination saw the connection end');
  });

  it('on the destination: the incoming migration fails with its error and the guest stays in inmigrate', async () => {
    const p = await Pair.create({ guest, wrapDestination: () => Promise.reject(new ChannelError('TLS handshake failed: no certificate', 'EPROTO')) });
    pairs.push(p);
    await p.migrate();
    assert.deepEqual(p.dst!.destination.info(), { status: 'failed', 'error-desc': 'TLS handshake failed: no certificate' });
    assert.equal(p.dst!.destination.current!.error!.kind, 'channel');
    assert.equal(p.dst!.machine.runState, 'inmigrate');
    assert.equal(p.src.source.status, 'failed');
    assert.equal(p.src.machine.runState, 'running');
  });
});

describe('a crashing loader is not a rejected stream', () => {
  const broken = (thrown: () => Error): SectionType => ({
    idstr: 'test-broken',
    instanceId: 0,
    version: 1,
    minVersion: 1,
    save: () => ({
      idstr: 'test-broken', instanceId: 0, version: 1,
      setup: (w) => w.put8(1),
      pending: () => ({ precopy: 0, postcopy: 0 }),
      iterate: () => undefined,
      completePrecopy: async (w) => w.put8(1),
      cleanup: () => undefined,
    }),
    load: () => ({
      load(r) {
        r.get8();
        throw thrown();
      },
    }),
  });

  for (const [what, thrown, kind] of [
    ['a TypeError', () => new TypeError("Cannot read properties of undefined (reading 'x')"), 'internal'],
    ['a MigrationStreamError', () => new MigrationStreamError('test-broken: bad payload'), 'stream'],
  ] as const) {
    it(`${what} is kind ${kind}`, async () => {
      const p = await Pair.create({ guest, sections: [broken(thrown)] });
      pairs.push(p);
      await p.migrate();
      const err = p.dst!.destination.current!.error!;
      assert.equal(err.kind, kind);
      assert.equal(err.phase, 'load');
      assert.equal(p.dst!.destination.info()['error-desc'], `load of migration failed: ${thrown().message}`);
      if (kind === 'internal') {
        assert.ok((err.cause as Error) instanceof TypeError, 'the original error is the cause');
        assert.ok(p.dst!.log.some((l) => l.includes('internal error') && l.includes('TypeError')), p.dst!.log.join('\n'));
      }
      assert.equal(p.dst!.machine.runState, 'inmigrate');
      assert.equal(p.src.machine.runState, 'running');
    });
  }
});
