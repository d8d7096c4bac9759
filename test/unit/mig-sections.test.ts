/**
 * The section registry: a test-only live section (`test-chunks`,
 * test/helpers/chunk-section.ts) migrates beside RAM through the unchanged
 * state machines, in precopy and across a postcopy switch, on an in-process
 * pair; the stream shows it where the registry puts it; a destination
 * without it, or with an older version, refuses the stream with QEMU's texts.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { inspectStream, type InspectedSection } from '../../src/migration/inspect.js';
import { SectionRegistry, RAM_SECTION } from '../../src/migration/index.js';
import { ChunkStore, chunkSection } from '../helpers/chunk-section.js';
import { Pair } from '../helpers/pair.js';

const pairs: Pair[] = [];
after(async () => {
  for (const p of pairs) await p.close();
});
async function pair(...args: Parameters<typeof Pair.create>): Promise<Pair> {
  const p = await Pair.create(...args);
  pairs.push(p);
  return p;
}

const CHUNKS = 64;
const guest = { ramSize: 8 << 20, smp: 1, fill: { kind: 'random' as const, seed: 3 }, workload: { kind: 'stress' as const, rate: 2 << 20, seed: 5 } };

/** Rewrites a chunk every millisecond while the source guest runs, like a disk written by the guest. */
function dirtyWhileRunning(p: Pair, store: ChunkStore): () => number {
  let n = 0;
  const t = setInterval(() => {
    if (p.src.machine.runState === 'running') store.write(n++ % CHUNKS, n);
  }, 1);
  return () => {
    clearInterval(t);
    return n;
  };
}

describe('a section registered beside RAM', () => {
  it('migrates in precopy: START, several PARTs, END; the destination store equals the source at switchover', async () => {
    const a = new ChunkStore(CHUNKS);
    const b = new ChunkStore(CHUNKS);
    for (let i = 0; i < CHUNKS; i++) a.write(i, 1000 + i);
    const p = await pair({ guest, sections: [chunkSection(a)], destinationSections: [chunkSection(b)], paused: true, params: { 'max-bandwidth': 8 << 20 } });
    const stop = dirtyWhileRunning(p, a);
    await p.migrate();
    const writes = stop();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.equal(p.dst!.destination.status, 'completed');
    assert.ok(writes > 0, 'the store changed during the migration');
    assert.ok(Buffer.from(a.bytes).equals(Buffer.from(b.bytes)), 'the stores are equal');
    assert.equal(a.sections.start, 1);
    assert.ok(a.sections.part >= 2, `${a.sections.part} PART sections`);
    assert.equal(a.sections.end, 1);
    assert.deepEqual(b.sections, a.sections, 'the destination loaded every section the source wrote');
    assert.equal(a.cleanups, 1, 'the source section was cleaned up once');
    assert.equal(b.cleanups, 1, 'the destination loader was cleaned up once');
    assert.equal((await p.dst!.machine.digest()).digest, (await p.src.machine.digest()).digest);
  });

  it('finishes at the postcopy switch (it cannot do postcopy) while RAM goes on by postcopy', async () => {
    const a = new ChunkStore(CHUNKS);
    const b = new ChunkStore(CHUNKS);
    for (let i = 0; i < CHUNKS; i++) a.write(i, 7 + i);
    let requested = false;
    const p = await pair({
      guest,
      caps: ['postcopy-ram'],
      sections: [chunkSection(a)],
      destinationSections: [chunkSection(b)],
      params: { 'max-bandwidth': 4 << 20 },
      onSourceTrace: (pt, pr) => {
        if (pt === 'slice' && !requested) {
          requested = true;
          pr.src.source.requestPostcopy();
        }
      },
    });
    const stop = dirtyWhileRunning(p, a);
    await p.migrate();
    stop();
    assert.equal(p.src.source.status, 'completed', JSON.stringify(p.src.source.info()));
    assert.ok(p.src.statuses.includes('postcopy-active'), p.src.statuses.join(' '));
    assert.ok(p.src.traces.includes('package-sent'));
    assert.ok(Buffer.from(a.bytes).equals(Buffer.from(b.bytes)), 'the stores are equal');
    assert.equal(a.sections.end, 1, 'one END, at the switch');
    assert.deepEqual(b.sections, a.sections);
    assert.equal(p.dst!.machine.runState, 'running');
  });

  it('stands on the wire after RAM, with the next section id; devices follow', async () => {
    const a = new ChunkStore(4);
    const file = (dir: string) => join(dir, 'stream.bin');
    const p = await pair({ guest: { ramSize: 1 << 20, smp: 1 }, sections: [chunkSection(a)], noDestination: true, uri: (d) => `exec:cat > ${file(d)}` });
    await p.migrate();
    assert.equal(p.src.source.status, 'completed');
    const liveLoaders = { 'test-chunks': chunkSection(new ChunkStore(4)).load(null as never) };
    const { records } = await inspectStream(readFileSync(file(p.dir)), { liveLoaders });
    const secs = records.filter((r): r is InspectedSection => r.type === 'section');
    const starts = secs.filter((s) => s.kind === 'start').map((s) => [s.sectionId, s.idstr, s.versionId]);
    assert.deepEqual(starts, [[2, 'ram', 4], [3, 'test-chunks', 1]]);
    const ends = secs.filter((s) => s.kind === 'end').map((s) => s.idstr);
    assert.deepEqual(ends, ['ram', 'test-chunks']);
    const full = secs.filter((s) => s.kind === 'full');
    assert.equal(full[0]!.sectionId, 4, 'devices are numbered after the live sections');
    assert.equal(full[0]!.idstr, 'timer');
  });

  it('a destination without it refuses the stream; the source fails and runs on', async () => {
    const a = new ChunkStore(8);
    const p = await pair({ guest, sections: [chunkSection(a)], destinationSections: [] });
    await p.migrate();
    assert.equal(p.dst!.destination.status, 'failed');
    assert.deepEqual(p.dst!.destination.info(), {
      status: 'failed',
      'error-desc': "load of migration failed: Unknown savevm section or instance 'test-chunks' 0",
    });
    assert.equal(p.dst!.destination.current!.error!.kind, 'stream');
    assert.equal(p.dst!.machine.runState, 'inmigrate');
    assert.equal(p.src.source.status, 'failed');
    assert.equal(p.src.machine.runState, 'running');
  });

  it('a newer version than the destination knows is refused', async () => {
    const p = await pair({ guest, sections: [chunkSection(new ChunkStore(8), 2)], destinationSections: [chunkSection(new ChunkStore(8), 1)] });
    await p.migrate();
    assert.equal(p.dst!.destination.info()['error-desc'], "load of migration failed: savevm: unsupported version 2 for 'test-chunks' v1");
    assert.equal(p.src.machine.runState, 'running');
  });

  it('the registry refuses a second registration and an inverted version range', () => {
    const r = new SectionRegistry([RAM_SECTION]);
    assert.throws(() => r.register(RAM_SECTION), /Section 'ram' instance 0 is already registered/);
    assert.throws(() => r.register({ ...chunkSection(new ChunkStore(1)), minVersion: 3 }), /minimum version 3 is above version 1/);
    assert.deepEqual(r.types.map((t) => t.idstr), ['ram']);
  });
});
