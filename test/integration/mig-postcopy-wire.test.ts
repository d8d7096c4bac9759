/**
 * A `ferry vm` postcopy destination driven byte by byte: the test plays the
 * source over a unix socket, writes the postcopy command sequence by hand
 * (docs/spec/stream-format.md §10, §11) and reads the return path (§12): PONGs, page
 * requests for the pages the running guest touches, and the final SHUT.
 * Then the command-order and format rules, each with QEMU's error text.
 */
import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { WIRE } from '../../src/migration/wire/constants.js';
import {
  decodeRpMessage,
  putCmdOpenReturnPath,
  putCmdPackaged,
  putCmdPing,
  putCmdPostcopyAdvise,
  putCmdPostcopyListen,
  putCmdPostcopyRun,
  putCmdRamDiscard,
  putEof,
  putFooter,
  putSectionPartEnd,
  putSectionStartFull,
  type RpMessage,
} from '../../src/migration/wire/records.js';
import { BufSink, buildStream } from '../helpers/streams.js';
import { cleanupAll, startVm, tempDir, waitFor, waitMigration, type VmHandle } from '../helpers/vm.js';

after(cleanupAll);

const S = WIRE.SECTION;
const RAM_SIZE = 4 << 20;
const PAGES = RAM_SIZE / 4096;
const BLOCK = 'pc.ram';

/** The `ram` START section: the block list. */
function ramStart(w: BufSink): void {
  putSectionStartFull(w, S.START, 2, 'ram', 0, 4);
  w.put64(RAM_SIZE | 0x04);
  w.putCountedString(BLOCK);
  w.put64(RAM_SIZE);
  w.put64(0x10);
  putFooter(w, 2);
}

/** A PART section with ZERO records carrying fill byte `fill` for `pages`. */
function ramPart(w: BufSink, pages: number[], fill = 0, type: typeof S.PART | typeof S.END = S.PART): void {
  putSectionPartEnd(w, type, 2);
  pages.forEach((p, i) => {
    w.put64(p * 4096 + (i === 0 ? 0x02 : 0x22));
    if (i === 0) w.putCountedString(BLOCK);
    w.put8(fill);
  });
  w.put64(0x10);
  putFooter(w, 2);
}

/** Plays the source: writes to the destination and collects its return path. */
class FakeSource {
  readonly rp: RpMessage[] = [];
  private buf = Buffer.alloc(0);
  closed = false;
  constructor(readonly sock: Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      for (;;) {
        const m = decodeRpMessage(this.buf);
        if (!m) break;
        this.rp.push(m.msg);
        this.buf = this.buf.subarray(m.size);
      }
    });
    sock.on('close', () => (this.closed = true));
    sock.on('error', () => undefined);
  }
  static async open(path: string): Promise<FakeSource> {
    const sock = connect(path);
    await new Promise<void>((res, rej) => sock.once('connect', res).once('error', rej));
    return new FakeSource(sock);
  }
  send(b: Buffer): void {
    this.sock.write(b);
  }
  waitFor(pred: (m: RpMessage) => boolean, what: string): Promise<RpMessage> {
    return waitFor(() => this.rp.find(pred) ?? null, 20000, what, 10) as Promise<RpMessage>;
  }
}

async function destination(dir: string, name: string, args: string[], postcopy = true): Promise<{ vm: VmHandle; path: string }> {
  const path = join(dir, `${name}.sock`);
  const vm = await startVm({ dir, name, args: ['-m', '4M', ...args, '-incoming', `unix:${path}`] });
  if (postcopy) {
    await vm.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'postcopy-ram', state: true }, { capability: 'events', state: true }],
    });
  }
  return { vm, path };
}

/** Everything up to and including the package: all pages discarded. */
function switchSequence(opts: { listen?: boolean } = {}): Buffer {
  return buildStream({
    body: (w) => {
      putCmdOpenReturnPath(w);
      putCmdPing(w, 1);
      putCmdPostcopyAdvise(w, 0x1000, 0x1000);
      ramStart(w);
      putCmdRamDiscard(w, BLOCK, [[0, RAM_SIZE]]);
      putCmdPing(w, 2);
      const pkg = new BufSink();
      if (opts.listen !== false) putCmdPostcopyListen(pkg);
      putCmdPing(pkg, 3);
      putCmdPostcopyRun(pkg);
      const blob = pkg.bytes();
      putCmdPackaged(w, blob.length);
      w.putBytes(blob);
      putCmdPing(w, 4);
    },
  });
}

describe('postcopy destination on the wire', () => {
  it('answers the pings, requests the pages its running guest touches, and ends with SHUT 0', async () => {
    const dir = tempDir();
    const { vm, path } = await destination(dir, 'dst', ['-workload', 'stress,rate=4M,seed=2,read=on']);
    const src = await FakeSource.open(path);
    src.send(switchSequence());
    await src.waitFor((m) => m.type === 'PONG' && m.value === 4, 'PONG 4');
    assert.deepEqual(src.rp.filter((m) => m.type === 'PONG').map((m) => (m as any).value).slice(0, 4), [1, 2, 3, 4]);
    // the guest runs with no page present: its first touch is a request naming the block
    const first = (await src.waitFor((m) => m.type === 'REQ_PAGES_ID', 'first page request')) as any;
    assert.equal(first.blockName, BLOCK);
    assert.equal(first.length, 4096);
    assert.equal(first.start % 4096, 0);
    assert.ok(first.start < RAM_SIZE);
    assert.equal((await vm.execute<any>('query-migrate')).status, 'postcopy-active');
    assert.equal(await vm.status(), 'running');
    // serve requests (non-zero fill so the guest's reads see data) until a few came
    const served = new Set<number>();
    await waitFor(() => {
      const want = src.rp
        .filter((m): m is RpMessage & { start: number } => m.type === 'REQ_PAGES_ID' || m.type === 'REQ_PAGES')
        .map((m) => m.start / 4096)
        .filter((p) => !served.has(p));
      if (want.length > 0) {
        const w = new BufSink();
        ramPart(w, want, 0x5a);
        src.send(w.bytes());
        want.forEach((p) => served.add(p));
      }
      return served.size >= 3 ? true : null;
    }, 20000, 'three page requests', 20);
    // every request is for a different page: a page is asked for once
    const asked = src.rp.filter((m) => m.type === 'REQ_PAGES_ID' || m.type === 'REQ_PAGES').map((m) => (m as any).start);
    assert.equal(new Set(asked).size, asked.length);
    // the rest, then END and EOF: every page is here, the destination completes
    const w = new BufSink();
    const rest = [...Array(PAGES).keys()].filter((p) => !served.has(p));
    ramPart(w, rest, 0x5a, S.END);
    putEof(w);
    src.send(w.bytes());
    const shut = (await src.waitFor((m) => m.type === 'SHUT', 'SHUT')) as any;
    assert.equal(shut.value, 0);
    const info = await waitMigration(vm);
    assert.equal(info.status, 'completed');
    const ev = vm.qmp.eventLog.filter((e) => e.event === 'MIGRATION').map((e) => (e.data as any).status);
    assert.deepEqual(ev, ['active', 'postcopy-active', 'completed']);
    assert.equal(await vm.status(), 'running');
    // pages the guest did not write since read back as the source sent them
    const faults = await vm.execute<any>('x-query-page-faults');
    assert.equal(faults.faults >= served.size, true, JSON.stringify(faults));
    src.sock.destroy();
    await vm.quit();
  });

  it('without the capability ADVISE is ignored and a precopy stream still loads', async () => {
    const dir = tempDir();
    // without postcopy-ram: ADVISE ignored (QEMU 7.2), a plain precopy stream still loads
    const { vm, path } = await destination(dir, 'plain', ['-S'], false);
    const src = await FakeSource.open(path);
    const all = [...Array(PAGES).keys()];
    src.send(buildStream({
      body: (w) => {
        putCmdOpenReturnPath(w);
        putCmdPing(w, 1);
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        ramStart(w);
        ramPart(w, all, 0, S.END);
        putEof(w);
      },
    }));
    const info = await waitMigration(vm);
    assert.equal(info.status, 'completed', JSON.stringify(info));
    assert.equal(((await src.waitFor((m) => m.type === 'SHUT', 'SHUT')) as any).value, 0);
    assert.ok(!src.rp.some((m) => m.type === 'REQ_PAGES_ID' || m.type === 'REQ_PAGES'));
    src.sock.destroy();
    await vm.quit();
  });
});

describe('postcopy commands out of order or malformed', () => {
  const cases: Array<{ name: string; body: (w: BufSink) => void; desc: string; postcopy?: boolean }> = [
    {
      name: 'DISCARD before ADVISE',
      body: (w) => {
        ramStart(w);
        putCmdRamDiscard(w, BLOCK, [[0, 4096]]);
      },
      desc: 'CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (0)',
    },
    {
      name: 'DISCARD without the capability (ADVISE ignored)',
      postcopy: false,
      body: (w) => {
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        ramStart(w);
        putCmdRamDiscard(w, BLOCK, [[0, 4096]]);
      },
      desc: 'CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (0)',
    },
    {
      name: 'LISTEN without ADVISE',
      body: (w) => putCmdPostcopyListen(w),
      desc: 'CMD_POSTCOPY_LISTEN in wrong postcopy state (0)',
    },
    {
      name: 'RUN before LISTEN',
      body: (w) => {
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        putCmdPostcopyRun(w);
      },
      desc: 'CMD_POSTCOPY_RUN in wrong postcopy state (1)',
    },
    {
      name: 'ADVISE with another page size',
      body: (w) => putCmdPostcopyAdvise(w, 0x201000, 0x1000),
      desc: 'Postcopy needs matching RAM page sizes (s=201000 d=1000)',
    },
    {
      name: 'ADVISE with another target page size',
      body: (w) => putCmdPostcopyAdvise(w, 0x1000, 0x2000),
      desc: 'Postcopy needs matching target page sizes (s=8192 d=4096)',
    },
    {
      name: 'DISCARD of an unknown block',
      body: (w) => {
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        putCmdRamDiscard(w, 'nope', [[0, 4096]]);
      },
      desc: "ram_discard_range: Failed to find block 'nope'",
    },
    {
      name: 'DISCARD past the end of the block',
      body: (w) => {
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        putCmdRamDiscard(w, BLOCK, [[RAM_SIZE - 4096, 8192]]);
      },
      desc: "ram_discard_range: Overrun block 'pc.ram' (3ff000/2000)",
    },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const dir = tempDir();
      const { vm, path } = await destination(dir, 'dst', ['-S'], c.postcopy ?? true);
      const src = await FakeSource.open(path);
      src.send(buildStream({
        body: (w) => {
          putCmdOpenReturnPath(w);
          c.body(w);
        },
      }));
      const info = await waitMigration(vm);
      assert.equal(info.status, 'failed');
      assert.equal(info['error-desc'], `load of migration failed: ${c.desc}`);
      assert.equal(((await src.waitFor((m) => m.type === 'SHUT', 'SHUT')) as any).value, 1);
      assert.equal(await vm.status(), 'inmigrate', 'the guest never ran');
      src.sock.destroy();
      await vm.quit();
    });
  }

  it('a PACKAGED blob that ends inside a section fails a listening destination for good', async () => {
    const dir = tempDir();
    const { vm, path } = await destination(dir, 'dst-pkg', ['-S']);
    const src = await FakeSource.open(path);
    src.send(buildStream({
      body: (w) => {
        putCmdOpenReturnPath(w);
        putCmdPostcopyAdvise(w, 0x1000, 0x1000);
        ramStart(w);
        const pkg = new BufSink();
        putCmdPostcopyListen(pkg);
        pkg.put8(S.FULL);
        pkg.put32(3); // section id, then nothing: the blob ends here
        const blob = pkg.bytes();
        putCmdPackaged(w, blob.length);
        w.putBytes(blob);
      },
    }));
    const info = await waitMigration(vm);
    assert.equal(info.status, 'failed');
    assert.equal(info['error-desc'], 'load of migration failed: Unexpected end of migration stream');
    assert.equal(((await src.waitFor((m) => m.type === 'SHUT', 'SHUT')) as any).value, 1);
    assert.equal(await vm.status(), 'internal-error');
    src.sock.destroy();
    await vm.quit();
  });

  it('XBZRLE after LISTEN, and EOF with pages missing, fail a listening destination for good', async () => {
    for (const tail of ['xbzrle', 'eof'] as const) {
      const dir = tempDir();
      const { vm, path } = await destination(dir, `dst-${tail}`, ['-S']);
      const src = await FakeSource.open(path);
      const w = new BufSink();
      if (tail === 'xbzrle') {
        putSectionPartEnd(w, S.PART, 2);
        w.put64(0x40);
        w.putCountedString(BLOCK);
        w.put8(1);
        w.put16(2);
        w.putBytes(Buffer.from([1, 9]));
      } else {
        ramPart(w, [0, 1]);
        putEof(w);
      }
      src.send(Buffer.concat([switchSequence(), w.bytes()]));
      const info = await waitMigration(vm);
      assert.equal(info.status, 'failed');
      assert.equal(info['error-desc'], tail === 'xbzrle'
        ? 'load of migration failed: Unknown combination of migration flags: 0x40 (postcopy mode)'
        : `load of migration failed: Postcopy stream ended with ${PAGES - 2} pages never received`);
      assert.equal(await vm.status(), 'internal-error');
      await assert.rejects(vm.execute('cont'), (e: any) => e.desc === 'Resetting the Virtual Machine is required');
      src.sock.destroy();
      await vm.quit();
    }
  });
});
