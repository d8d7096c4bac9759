/**
 * Postcopy interop with QEMU 7.2, both directions, 64 MiB `-machine none`
 * guests over tcp. `postcopy-ram` is on on both sides (the destination before
 * the stream starts) and `migrate-start-postcopy` is issued right after
 * `migrate`, with max-bandwidth low enough that precopy cannot finish first:
 * most RAM crosses in the postcopy phase (docs/spec/stream-format.md §11). Only RAM
 * crosses; the destination's pmemsave must equal the frozen source's.
 * Neither guest touches its RAM after the switch, so the destination raises no
 * page faults and `postcopy-requests` is normally 0 (reported, not asserted).
 * A tcp proxy between the two records the return path (destination → source,
 * docs/spec/stream-format.md §12): PONG 1–4 (PING 3 travels inside PACKAGED), SHUT 0.
 */
import { after, before, describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { runMigration, type Expect } from '../helpers/migration.js';
import { cleanupAll, tempDir } from '../helpers/vm.js';
import { QEMU_SKIP, assertSameRam, cleanupQemu, freePort, pmem } from '../helpers/qemu.js';

after(async () => {
  for (const p of taps.splice(0)) p.close();
  await cleanupQemu();
  await cleanupAll();
});

const SIZE = 64 << 20;
/** 20 MB/s: a 64 MiB random guest needs > 3 s of precopy, the switch comes first */
const SLOW = 20e6;
const FERRY_DST = ['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=64M'];
const FERRY_COMPAT = ['-machine', 'none,memory-backend=m,x-qemu-compat=on', '-object', 'memory-backend-ram,id=m,size=64M'];
const QEMU_DST = ['-machine', 'none,memory-backend=m', '-object', 'memory-backend-ram,id=m,size=64M'];

const POSTCOPY_EVENTS = ['setup', 'active', 'postcopy-active', 'completed'];
/**
 * Both sides completed, the source postmigrate, the destination running
 * (within 10 s), the same MIGRATION events on both (within 5 s).
 */
const EXPECT: Expect = {
  events: { source: POSTCOPY_EVENTS, destination: POSTCOPY_EVENTS },
  settleMs: { destinationRunState: 10000, events: 5000 },
};

interface Tap {
  port: number;
  /** everything the destination sent back (the return path) */
  back(): Buffer;
  close(): void;
}

const taps: Tap[] = [];

/** A tcp proxy 127.0.0.1:port → 127.0.0.1:target that records the reverse direction. */
function tap(target: number): Promise<Tap> {
  const chunks: Buffer[] = [];
  const socks: Socket[] = [];
  const server = createServer((a) => {
    const b = connect(target, '127.0.0.1');
    socks.push(a, b);
    b.on('data', (d: Buffer) => chunks.push(d));
    a.pipe(b);
    b.pipe(a);
    a.on('error', () => b.destroy());
    b.on('error', () => a.destroy());
  });
  return new Promise((res, rej) => {
    server.once('error', rej);
    server.listen(0, '127.0.0.1', () => {
      const t: Tap = {
        port: (server.address() as { port: number }).port,
        back: () => Buffer.concat(chunks),
        close: () => {
          for (const s of socks) s.destroy();
          server.close();
        },
      };
      taps.push(t);
      res(t);
    });
  });
}

const RP = ['INVALID', 'SHUT', 'PONG', 'REQ_PAGES_ID', 'REQ_PAGES'];

/** Decode return path messages (be16 type, be16 length, data) as e.g. "PONG 1", "SHUT 0", "REQ_PAGES_ID". */
function returnPath(buf: Buffer): string[] {
  const out: string[] = [];
  for (let o = 0; o + 4 <= buf.length; ) {
    const type = buf.readUInt16BE(o);
    const len = buf.readUInt16BE(o + 2);
    const name = RP[type] ?? `type${type}`;
    out.push(len === 4 && (type === 1 || type === 2) ? `${name} ${buf.readUInt32BE(o + 4)}` : name);
    o += 4 + len;
  }
  return out;
}

/** PONG 1–4 in any order (7.2 answers PING 3 from the package after PING 4), page requests anywhere, SHUT 0 last. */
function assertReturnPath(msgs: string[], what: string): void {
  const pongs = msgs.filter((m) => m.startsWith('PONG')).sort();
  assert.deepEqual(pongs, ['PONG 1', 'PONG 2', 'PONG 3', 'PONG 4'], `${what}: ${msgs.join(', ')}`);
  assert.equal(msgs.at(-1), 'SHUT 0', `${what}: ${msgs.join(', ')}`);
  const other = msgs.filter((m) => !m.startsWith('PONG') && !m.startsWith('REQ_PAGES')).slice(0, -1);
  assert.deepEqual(other, [], `${what}: ${msgs.join(', ')}`);
}

let dir = '';
let image: Buffer = Buffer.alloc(0);
let imagePath = '';

/** The destination listens on a free port; the source migrates through a tap in front of it. */
async function tapped(): Promise<{ proxy: Tap; uri: string; incoming: string }> {
  const port = await freePort();
  const proxy = await tap(port);
  return { proxy, uri: `tcp:127.0.0.1:${proxy.port}`, incoming: `tcp:127.0.0.1:${port}` };
}

async function qemuToFerry(t: TestContext): Promise<void> {
  const t0 = Date.now();
  const { proxy, uri, incoming } = await tapped();
  const port = proxy.port;
  const { info: qinfo, times } = await runMigration({
    dir,
    source: {
      qemu: true,
      name: `qemu-${port}`,
      args: ['-machine', 'none,memory-backend=m', '-object', `memory-backend-file,id=m,size=64M,mem-path=${imagePath},share=off`],
      parameters: { 'max-bandwidth': SLOW },
    },
    destination: { name: `dst-${port}`, machine: FERRY_DST, paused: false, defer: true, capabilities: ['events', 'postcopy-ram'] },
    capabilities: ['events', 'postcopy-ram'],
    transport: { uri, incoming },
    during: ({ src }) => src.execute('migrate-start-postcopy'),
    timeoutMs: 30000,
    // a QEMU source leaves finish-migrate for postmigrate a moment after query-migrate said completed
    expect: { ...EXPECT, settleMs: { sourceRunState: 5000, destinationRunState: 10000, events: 5000 } },
    after: async ({ src: qemu, d: dst }) => {
      assertSameRam(await pmem(dst, dir, SIZE), image, 'qemu → ferry (postcopy)');
      assertSameRam(await pmem(qemu, dir, SIZE), image, 'qemu source itself');
      assert.equal(qemu.stderr.trim(), '', 'QEMU source printed nothing');
    },
  });
  const rp = returnPath(proxy.back());
  proxy.close();
  assertReturnPath(rp, 'Ferry destination return path');
  const ram = qinfo.ram ?? {};
  t.diagnostic(`qemu→ferry return path: ${rp.join(', ')}`);
  t.diagnostic(
    `qemu→ferry: ${Date.now() - t0} ms (source completed at ${times.sourceEnded! - t0} ms); source total-time ${qinfo['total-time']} ms, downtime ${qinfo.downtime} ms, ` +
      `transferred ${ram.transferred}, postcopy-requests ${ram['postcopy-requests']}`,
  );
}

async function ferryToQemu(t: TestContext, guest: 'random' | 'stress'): Promise<void> {
  const t0 = Date.now();
  const { proxy, uri, incoming } = await tapped();
  const port = proxy.port;
  let run;
  try {
    run = await runMigration({
      dir,
      guest: guest === 'random' ? { fill: 'random,seed=14' } : { smp: 2, fill: 'random,seed=15', workload: 'stress,rate=4M,seed=19' },
      source: { name: `src-${port}`, machine: FERRY_COMPAT, parameters: { 'max-bandwidth': SLOW } },
      destination: { qemu: true, name: `qemu-${port}`, args: QEMU_DST, defer: true, capabilities: ['events', 'postcopy-ram'] },
      capabilities: ['events', 'postcopy-ram'],
      transport: { uri, incoming },
      during: ({ src }) => src.execute('migrate-start-postcopy'),
      timeoutMs: 30000,
      destinationTimeoutMs: 20000,
      expect: EXPECT,
      after: async ({ src, d: qemu }) => {
        const want = await pmem(src, dir, SIZE);
        const got = await pmem(qemu, dir, SIZE);
        assertSameRam(got, want, `ferry(${guest}) → qemu (postcopy)`);
        assert.equal(qemu.stderr.trim(), '', 'QEMU printed nothing while loading');
      },
    });
  } catch (e) {
    // a QEMU destination needs userfaultfd (root, or vm.unprivileged_userfaultfd=1)
    if (/Postcopy is not supported/.test((e as { desc?: string }).desc ?? '')) {
      proxy.close();
      t.skip('QEMU cannot be a postcopy destination on this host (no userfaultfd for it)');
      return;
    }
    throw e;
  }
  const { info, times } = run;
  const rp = returnPath(proxy.back());
  proxy.close();
  assertReturnPath(rp, 'QEMU destination return path');
  const ram = info.ram ?? {};
  t.diagnostic(`ferry(${guest})→qemu return path: ${rp.join(', ')}`);
  t.diagnostic(
    `ferry(${guest})→qemu: ${Date.now() - t0} ms (source completed at ${times.sourceEnded! - t0} ms); source total-time ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
      `transferred ${ram.transferred}, postcopy-requests ${ram['postcopy-requests']}`,
  );
}

describe('postcopy interop with QEMU 7.2 (64 MiB, tcp)', { skip: QEMU_SKIP, timeout: 300000 }, () => {
  before(() => {
    dir = tempDir('ferry-postcopy-');
    image = randomBytes(SIZE);
    // some zero pages and a text page, so both ZERO and normal records appear
    image.fill(0, 0x10000, 0x30000);
    image.write('ferry postcopy interop page', 0x40000);
    imagePath = join(dir, 'guest.img');
    writeFileSync(imagePath, image);
  });
  it('QEMU source → Ferry destination, postcopy switch right away', { timeout: 60000 }, (t) => qemuToFerry(t));
  it('Ferry source (x-qemu-compat=on, random fill) → QEMU destination, postcopy', { timeout: 60000 }, (t) =>
    ferryToQemu(t, 'random'));
  it('Ferry source (x-qemu-compat=on, stress workload) → QEMU destination, postcopy', { timeout: 60000 }, (t) =>
    ferryToQemu(t, 'stress'));
});
