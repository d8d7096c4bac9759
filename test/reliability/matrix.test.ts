/**
 * The fault matrix: every phase of a migration (guest.ts PHASES) crossed
 * with every fault (FAULTS below), each cell a real migration of the same
 * guest that must end in a known state:
 *
 *   - the source runs on with its memory intact: after the workload's steps
 *     its digest equals the reference (a machine that never migrated), and
 *     the destination never ran;
 *   - or the destination took the guest over (it completed, runs, and its
 *     memory reaches the reference);
 *   - or, after the postcopy switch, the guest is lost in the documented way
 *     (the source stays stopped in postmigrate, the destination stops in
 *     internal-error: Ferry has no postcopy recovery);
 *   - a flipped payload byte that the stream format cannot see is recorded
 *     as such, with how much of the guest differs (the 2.10 stream has no
 *     checksum; TLS would refuse it);
 * and, in every cell, a new migration of the guest's owner afterwards
 * completes with the reference memory, and no descriptor, listener, socket
 * or child process is left over.
 *
 * Both engines run in this process (the pair of test/helpers/pair.ts, with
 * a fault relay on the stream); a side that is killed with SIGKILL runs in
 * a child process (side-child.ts) instead. The results table is written to
 * docs/reliability.md.
 *
 * The block row's guest has a drive under a disk workload (guest.ts
 * blockGuest): there the disks count as much as the memory. A source that
 * runs on has the reference drive (its disk workload ran its steps on it,
 * nothing lost to the failed copy), a destination that took over has it
 * too, and a destination that did not complete never ran (its half-written
 * drive never served a guest). The migration afterwards copies the drive
 * as well.
 *
 * The COLO checkpoint row (runColoCell, colo-cell.ts) hits a checkpoint of
 * a COLO pair while its bytes are in transit. There the owner of the guest
 * after the fault is the primary (after its x-colo-lost-heartbeat) or, when
 * the primary was killed, the secondary (after its own), which must run
 * from the last complete checkpoint (digest D1), never from part of the
 * faulted one; both then reach the reference as above.
 *
 * Each cell has its own leak baseline, taken right before it starts.
 */
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine } from '../../src/machine/index.js';
import {
  BLOCK_DRIVES_SECTION,
  BLOCK_SECTION,
  ColoService,
  MigrationDestination,
  MigrationObserver,
  MigrationOptions,
  MigrationSource,
  RAM_SECTION,
  SectionRegistry,
  machinePort,
} from '../../src/migration/index.js';
import type { SourceTracePoint } from '../../src/migration/core/outgoing.js';
import { QmpServer } from '../../src/qmp/index.js';
import { COMMANDS } from '../../src/generated/qapi-commands.js';
import { handlers } from '../../src/commands/handlers.js';
import type { Ctx, VmServices } from '../../src/commands/context.js';
import { NbdService } from '../../src/commands/nbd.js';
import { shq } from '../helpers/vm.js';
import { FaultRelay } from './fault-relay.js';
import {
  GUEST,
  PHASES,
  SOURCE_PARAMS,
  baseImage,
  blockDestination,
  blockGuest,
  holdFrom,
  referenceDigest,
  referenceDiskDigest,
  workloadDone,
  type PhaseDef,
} from './guest.js';
import { leaked, snapshot } from './leaks.js';
import { COLO_CAPS, COLO_PARAMS, COLO_ROW, ColoAim, bytesOut, until } from './colo-cell.js';
import { writeSection } from './report.js';

const here = dirname(fileURLToPath(import.meta.url));
const CHILD = join(here, 'side-child.js');
const ROOT = process.getuid?.() === 0;

type FaultName = 'kill-source' | 'kill-destination' | 'cancel' | 'cut' | 'truncate' | 'flip' | 'qmp-gone' | 'disk-full' | 'disk-full-rp';

const diskFull = (f: FaultName): boolean => f === 'disk-full' || f === 'disk-full-rp';

interface FaultDef {
  name: FaultName;
  what: string;
  /** Why this fault cannot hit this row, or null. */
  notApplicable?(row: Row): string | null;
}

let tmpfsWorks: string | null = null; // null: works; else the reason it does not

const FAULTS: FaultDef[] = [
  { name: 'kill-source', what: 'the source process gets SIGKILL (it runs in a child, frozen at the phase)' },
  { name: 'kill-destination', what: 'the destination process gets SIGKILL' },
  { name: 'cancel', what: '`migrate_cancel`' },
  { name: 'cut', what: 'the connection is cut (both sockets of the relay destroyed)' },
  { name: 'truncate', what: "the stream ends at a random byte of the phase's bytes (the destination reads EOF there)" },
  { name: 'flip', what: "one random byte of the phase's bytes is inverted on its way" },
  { name: 'qmp-gone', what: 'a QMP client sends query-migrate and migrate-set-parameters and closes its socket before the replies' },
  {
    name: 'disk-full',
    what: 'migrating to `exec:cat > FILE` on a small tmpfs that fills up, without the return path (the file is the destination: loaded from it when the source completed)',
    notApplicable: (p) =>
      p.colo
        ? 'COLO needs a socket with a return path: its messages come back on the migration channel, which `exec:cat > FILE` cannot carry'
        : p.postcopy
          ? 'postcopy needs a return path, which `exec:cat > FILE` cannot carry'
          : tmpfsWorks,
  },
  {
    name: 'disk-full-rp',
    what: 'the same with the return path on: no SHUT can come from a file, so the source ends the command\'s input after its last byte and fails when the command exits (its exit status when the disk was full)',
    notApplicable: (p) =>
      p.colo
        ? 'COLO into a file: a file sends no checkpoint-ready, so no COLO session can begin'
        : p.postcopy
          ? 'postcopy into a file: no destination could run the guest after the switch'
          : tmpfsWorks,
  },
];

/** A row of the table: a precopy phase of guest.ts, or COLO's (colo-cell.ts). */
type Row = Pick<PhaseDef, 'name' | 'what' | 'caps' | 'postcopy'> & { colo?: boolean };

const COLO: Row = {
  name: COLO_ROW,
  what:
    'a COLO pair (x-colo), its last checkpoint taken with the guest paused (digest D1), the guest run on, and the next checkpoint: ' +
    'its bytes in transit (the primary\'s colo-checkpoint and colo-checkpoint-sent trace points); stream faults hit a random byte of that checkpoint',
  caps: COLO_CAPS as never,
  colo: true,
};

const ROWS: Row[] = [...PHASES, COLO];

type Outcome =
  | 'primary runs on'
  | 'secondary took over'
  | 'the pair goes on'
  | 'source runs on'
  | 'destination took over'
  | 'guest died with the source'
  | 'guest lost after the switch'
  | 'flip not seen by the format';

interface Result {
  phase: string;
  fault: FaultName;
  outcome?: Outcome;
  detail?: string;
  na?: string;
  error?: string;
}

const results: Result[] = [];
let REF = '';
/** The block guest's drive after its disk steps, and the image every block cell starts from. */
let REF_DISK = '';
let BASE_DIR = '';
const baseImagePath = (): string => join(BASE_DIR, 'base.raw');

/** A small xorshift for the fault offsets, seeded per cell. */
function rng(seed: number): () => number {
  let x = seed * 2654435761 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function killNow(child: ChildProcess): void {
  // synchronously: SIGKILL, then wait until the process is gone (a zombie, its sockets closed)
  child.kill('SIGKILL');
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const t0 = Date.now();
  for (;;) {
    let state = 'gone';
    try {
      const stat = readFileSync(`/proc/${child.pid}/stat`, 'latin1');
      state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    } catch {
      // reaped already
    }
    if (state === 'gone' || state === 'Z' || Date.now() - t0 > 3000) return;
    Atomics.wait(sleeper, 0, 0, 2);
  }
}

interface Child {
  child: ChildProcess;
  /** resolves with the next line the child prints (lines are queued) */
  nextLine(): Promise<string>;
  exited: Promise<void>;
  stderr: string[];
}

async function startChild(args: object): Promise<Child> {
  // stdin: the COLO primary waits there for the relay to hold its checkpoint (side-child.ts)
  const child = spawn(process.execPath, [CHILD, JSON.stringify(args)], { stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: string[] = [];
  child.stderr!.on('data', (d: Buffer) => stderr.push(d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const queued: string[] = [];
  const waiting: ((l: string) => void)[] = [];
  let partial = '';
  child.stdout!.on('data', (d: Buffer) => {
    const parts = (partial + d.toString()).split('\n');
    partial = parts.pop()!;
    for (const l of parts) {
      const w = waiting.shift();
      if (w) w(l);
      else queued.push(l);
    }
  });
  const nextLine = (): Promise<string> => (queued.length ? Promise.resolve(queued.shift()!) : new Promise((r) => waiting.push(r)));
  const first = await withTimeout(nextLine(), 20000, `the child starting: ${stderr.join('')}`);
  assert.equal(first, '{"ready":true}', `child: ${stderr.join('')}`);
  return { child, nextLine, exited, stderr };
}

function newOptions(caps: string[], params?: Record<string, number>): MigrationOptions {
  const o = new MigrationOptions();
  if (caps.length) o.setCapabilities(caps.map((c) => ({ capability: c as never, state: true })));
  if (params) o.setParameters(params);
  return o;
}

const sections = (): SectionRegistry => new SectionRegistry([RAM_SECTION, BLOCK_SECTION, BLOCK_DRIVES_SECTION]);

interface DstSide {
  machine: Machine;
  destination: MigrationDestination;
  ran: boolean;
}

/** `disk`: the block guest's destination, with an empty drive in that image. */
async function newDestination(uri: string, caps: string[], disk?: string): Promise<DstSide> {
  const machine = await Machine.create({ ...GUEST, ...(disk ? blockDestination(disk) : {}), incoming: true, fill: undefined });
  const side: DstSide = { machine, destination: null!, ran: false };
  machine.on('runstate', (now: string) => {
    if (now === 'running') side.ran = true;
  });
  side.destination = new MigrationDestination(machinePort(machine, { autostart: true }), newOptions(caps), {
    lookupFd: () => undefined,
    sections: sections(),
    log: () => undefined,
  });
  await side.destination.start(uri);
  return side;
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string | (() => string)): Promise<T> {
  let t: NodeJS.Timeout;
  const text = (): string => (typeof what === 'string' ? what : what());
  return Promise.race([p, new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`timed out: ${text()}`)), ms)))]).finally(() => clearTimeout(t));
}

/**
 * The owner of the guest migrates it once more, to a fresh destination: it
 * must complete with the reference memory (and with `block`, its drive).
 */
async function migrateAgain(owner: Machine, dir: string, block: boolean): Promise<void> {
  const uri = `unix:${join(dir, 'again.sock')}`;
  const caps = block ? ['block'] : [];
  const dst = await newDestination(uri, caps, block ? join(dir, 'again.raw') : undefined);
  const source = new MigrationSource(machinePort(owner, { autostart: true }), newOptions(caps, { 'max-bandwidth': 0 }), {
    lookupFd: () => undefined,
    sections: sections(),
    log: () => undefined,
  });
  try {
    source.start(uri);
    await withTimeout(source.whenIdle(), 20000, 'the migration afterwards');
    await withTimeout(dst.destination.whenDone(), 20000, 'its destination');
    assert.equal(source.status, 'completed', `the migration afterwards: ${JSON.stringify(source.info())}`);
    assert.equal(dst.destination.status, 'completed');
    await workloadDone(dst.machine);
    assert.equal((await dst.machine.digest()).digest, REF, 'the migration afterwards delivered the reference memory');
    if (block) assert.equal((await dst.machine.blockDigest()).digest, REF_DISK, 'the migration afterwards delivered the reference drive');
  } finally {
    await dst.machine.destroy();
  }
}

/** Fill the filesystem at `dir` up to its last byte. */
function fillUp(dir: string): void {
  const fd = openSync(join(dir, 'filler'), 'w');
  const chunk = Buffer.alloc(1 << 20, 0xaa);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOSPC') throw e;
    // the last partial block
    try {
      for (;;) writeSync(fd, chunk, 0, 1);
    } catch {
      // full
    }
  } finally {
    closeSync(fd);
  }
}

/** A QMP monitor over the in-process source (the handlers of `ferry vm`). */
async function monitor(dir: string, machine: Machine, options: MigrationOptions, source: MigrationSource): Promise<{ server: QmpServer<Ctx>; path: string }> {
  const destination = new MigrationDestination(machinePort(machine, { autostart: true }), options, { lookupFd: () => undefined, sections: sections() });
  const vm: VmServices = {
    machine,
    options,
    source,
    destination,
    observe: new MigrationObserver({ source, destination, options, ram: () => machine.ram, faultStats: () => machine.faultStats() }),
    colo: source.colo,
    nbd: new NbdService(),
    log: () => undefined,
    incomingMode: 'none',
    objects: new Map(),
    fds: new Map(),
    commandNames: [...COMMANDS.keys()],
    version: { qemu: { major: 2, minor: 10, micro: 0 }, package: 'ferry-test' },
    autostart: true,
    requestQuit: () => undefined,
  };
  const server = new QmpServer<Ctx>({ commands: COMMANDS, handlers, makeContext: (conn) => ({ vm, conn }), version: vm.version });
  const path = join(dir, 'qmp.sock');
  await server.listen(`unix:${path},server=on,wait=off`);
  return { server, path };
}

/** A negotiated raw QMP connection. */
async function rawClient(path: string): Promise<net.Socket> {
  const s = net.connect(path);
  let buf = '';
  await new Promise<void>((resolve, reject) => {
    s.on('error', reject);
    s.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.includes('"QMP"') && !buf.includes('"return"') && buf.endsWith('\n') && !buf.includes('sent')) {
        buf += 'sent';
        s.write('{"execute":"qmp_capabilities"}\n');
      }
      if (buf.includes('"return"')) resolve();
    });
  });
  s.removeAllListeners('data');
  s.removeAllListeners('error');
  s.on('error', () => undefined);
  return s;
}

async function runCell(phase: PhaseDef, fault: FaultDef, seed: number): Promise<Result> {
  const res: Result = { phase: phase.name, fault: fault.name };
  const dir = mkdtempSync(join(tmpdir(), 'ferry-matrix-'));
  // `disk-full` runs without the return path, `disk-full-rp` with it
  const caps = (phase.caps as string[]).filter((c) => fault.name !== 'disk-full' || c !== 'return-path');
  const rand = rng(seed);
  const dstSock = join(dir, 'dst.sock');
  const relaySock = join(dir, 'relay.sock');
  let relay: FaultRelay | null = null;
  let dst: DstSide | null = null;
  let dstChild: Child | null = null;
  let srcChild: Child | null = null;
  let src: { machine: Machine; source: MigrationSource; options: MigrationOptions } | null = null;
  let qmp: { server: QmpServer<Ctx>; path: string } | null = null;
  let qmpClient: net.Socket | null = null;
  let mnt: string | null = null;
  const paramsAfter = { 'downtime-limit': 2 };
  // the block row: the source's drive (a copy of the base image) and the destination's (empty)
  const srcImg = phase.block ? join(dir, 'src.raw') : undefined;
  const dstImg = phase.block ? join(dir, 'dst.raw') : undefined;
  if (srcImg) copyFileSync(baseImagePath(), srcImg);
  try {
    // the destination: in a child when it is the one killed
    let uri = `unix:${relaySock}`;
    if (!diskFull(fault.name)) {
      if (fault.name === 'kill-destination') dstChild = await startChild({ role: 'destination', uri: `unix:${dstSock}`, caps, disk: dstImg });
      else dst = await newDestination(`unix:${dstSock}`, caps, dstImg);
      relay = await FaultRelay.listen(relaySock, dstSock);
    } else {
      mnt = join(dir, 'mnt');
      mkdirSync(mnt);
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', mnt]);
      uri = `exec:cat > ${shq(join(mnt, 'state'))}`;
    }

    if (fault.name === 'kill-source') {
      const sc = await startChild({ role: 'source', uri, caps, phase: phase.name, disk: srcImg });
      srcChild = sc;
      const hit = await withTimeout(
        sc.nextLine(),
        30000,
        () => `the source child reaching ${phase.name} (destination ${dst!.destination.status}, ${dst!.machine.runState}; child: ${sc.stderr.join('')})`,
      );
      assert.match(hit, /"hit"/, srcChild.stderr.join(''));
      srcChild.child.kill('SIGKILL');
      await srcChild.exited;
    } else {
      const machine = await Machine.create({ ...GUEST, ...(srcImg ? blockGuest(srcImg) : {}) });
      const options = newOptions(caps, phase.params ?? SOURCE_PARAMS);
      let fired = false;
      let holding = false;
      let applied = false;
      let holdStart = 0;
      let askedPostcopy = false;
      const source: MigrationSource = new MigrationSource(machinePort(machine, { autostart: true }), options, {
        lookupFd: () => undefined,
        sections: sections(),
        log: () => undefined,
        trace: (pt: SourceTracePoint) => {
          const info = source.info();
          // bytes put into the stream so far: they reach the relay in this order
          const written = source.current?.writer?.bytesWritten ?? 0;
          if (phase.postcopy && pt === 'slice' && !askedPostcopy) {
            askedPostcopy = true;
            source.requestPostcopy();
          }
          if (fault.name === 'truncate' || fault.name === 'flip') {
            if (!holding && holdFrom(phase, pt, info)) {
              holding = true;
              holdStart = written;
              relay!.hold(holdStart);
              return;
            }
            if (holding && !applied && (phase.until(pt, info) || pt === 'disposed')) {
              applied = true;
              const at = holdStart + Math.floor(rand() * Math.max(1, written - holdStart));
              res.detail = `byte ${at} of [${holdStart}, ${written})`;
              if (fault.name === 'truncate') relay!.truncate(at);
              else relay!.flip(at);
              relay!.release();
            }
            return;
          }
          if (fired || !phase.at(pt, info)) return;
          fired = true;
          switch (fault.name) {
            case 'kill-destination':
              killNow(dstChild!.child);
              break;
            case 'cancel':
              source.cancel();
              break;
            case 'cut':
              relay!.cut();
              break;
            case 'qmp-gone':
              leaveMidCommand(qmpClient!, paramsAfter);
              break;
            case 'disk-full':
            case 'disk-full-rp':
              fillUp(mnt!);
              break;
          }
        },
      });
      src = { machine, source, options };
      ({ qmp, client: qmpClient } = await qmpGoneSetup(fault.name, dir, src));
      source.start(uri);
      await withTimeout(source.whenIdle(), 30000, 'the source to end');
      if (fault.name === 'qmp-gone') {
        // the command of the client that left still ran, and the monitor serves others
        assert.equal(options.get('downtime-limit'), paramsAfter['downtime-limit'], 'migrate-set-parameters of the client that left took effect');
        const other = await rawClient(qmp!.path);
        other.destroy();
      }
    }
    if (diskFull(fault.name) && src!.source.status === 'completed') {
      // cat wrote the whole stream before the disk filled up: the file must then load whole
      dst = await newDestination(`exec:cat ${shq(join(mnt!, 'state'))}`, caps, dstImg);
      res.detail = 'the file was whole before the disk filled; loaded from it';
    }
    if (dst) await withTimeout(dst.destination.whenDone(), 30000, 'the destination to end');

    // ---- the known state
    const s = src?.source.status;
    const d = dst?.destination.status;
    const srcRuns = src !== null && src.machine.runState === 'running';
    const desc = `source ${s ?? 'killed'} (${src?.machine.runState ?? '-'}), destination ${d ?? (diskFull(fault.name) ? 'none' : 'killed')} (${dst?.machine.runState ?? '-'})`;
    let owner: Machine | null = null;
    if (srcRuns) {
      assert.ok(s === 'failed' || s === 'cancelled', `a source that runs on has failed or was cancelled: ${desc}`);
      assert.ok(!dst || (d !== 'completed' && !dst.ran), `the destination never ran a half-loaded guest: ${desc}`);
      await workloadDone(src!.machine);
      assert.equal((await src!.machine.digest()).digest, REF, `the source memory is intact: ${desc}`);
      if (phase.block) assert.equal((await src!.machine.blockDigest()).digest, REF_DISK, `the source drive is intact: ${desc}`);
      res.outcome = 'source runs on';
      owner = src!.machine;
    } else if (dst && d === 'completed') {
      assert.ok(!src || src.machine.runState === 'postmigrate', desc);
      assert.equal(dst.machine.runState, 'running', desc);
      await workloadDone(dst.machine);
      const digest = (await dst.machine.digest()).digest;
      const diskDigest = phase.block ? (await dst.machine.blockDigest()).digest : REF_DISK;
      if (digest !== REF || diskDigest !== REF_DISK) {
        assert.equal(fault.name, 'flip', `the destination that took over has the reference memory and drive: ${desc}`);
        res.outcome = 'flip not seen by the format';
        res.detail = [res.detail, digest !== REF ? 'memory differs' : 'the drive differs'].filter(Boolean).join('; ');
      } else {
        res.outcome = 'destination took over';
        owner = dst.machine;
      }
    } else if (fault.name === 'kill-source' && !phase.postcopy) {
      // the guest lived in the killed process; the destination must not run what it got
      assert.ok(d !== 'completed' && !dst!.ran && dst!.machine.runState === 'inmigrate', `the destination never ran a half-loaded guest: ${desc}`);
      res.outcome = 'guest died with the source';
    } else {
      assert.ok(phase.postcopy, `no side runs the guest, outside postcopy: ${desc}`);
      assert.ok(!src || src.machine.runState === 'postmigrate', desc);
      // stopped for good after its LISTEN, or never got that far (a cut before the package arrived)
      assert.ok(!dst || (dst.machine.runState === 'internal-error' || (dst.machine.runState === 'inmigrate' && !dst.ran)), desc);
      res.outcome = 'guest lost after the switch';
    }
    res.detail = [desc, res.detail].filter(Boolean).join('; ');

    // ---- a new migration afterwards: the owner's, or a fresh guest's
    if (owner) {
      await migrateAgain(owner, dir, phase.block === true);
    } else {
      const freshImg = join(dir, 'fresh.raw');
      if (phase.block) copyFileSync(baseImagePath(), freshImg);
      const fresh = await Machine.create({ ...GUEST, ...(phase.block ? blockGuest(freshImg) : {}) });
      try {
        await workloadDone(fresh);
        await migrateAgain(fresh, dir, phase.block === true);
      } finally {
        await fresh.destroy();
      }
    }
  } finally {
    await tearDown({ srcChild, dstChild, src, dst, qmp, relay });
    if (mnt) execFileSync('umount', [mnt]);
    rmSync(dir, { recursive: true, force: true });
  }
  await listenerGone(dstSock);
  return res;
}

/**
 * A cell of the COLO row (colo-cell.ts): the pair, its last checkpoint D1
 * (the guest paused), the guest run on, and the fault in the checkpoint
 * that follows, while its bytes are in transit. Then, as in QEMU:
 *
 *   - the primary survives (the secondary killed, the link cut, the
 *     checkpoint truncated or refused, migrate_cancel): its session breaks,
 *     it reports the error and keeps its guest stopped in `colo` until
 *     x-colo-lost-heartbeat; then it runs alone (status completed) and
 *     reaches the reference memory. The secondary that is left must not
 *     have taken anything of the faulted checkpoint: told to take over
 *     afterwards, it is at D1 (its run state paused, as the primary was);
 *   - the primary killed: the secondary reports the broken link and, after
 *     x-colo-lost-heartbeat, runs from D1 (never from half a checkpoint),
 *     although its own guest ran ahead meanwhile, and reaches the reference;
 *   - a flipped byte the format cannot see (inside a page): the secondary
 *     loads the checkpoint and the pair goes on;
 *   - the QMP client gone: the pair goes on, the command took effect.
 *
 * The guest's owner then migrates once more (migrateAgain).
 */
async function runColoCell(fault: FaultDef, seed: number): Promise<Result> {
  const res: Result = { phase: COLO_ROW, fault: fault.name };
  const dir = mkdtempSync(join(tmpdir(), 'ferry-matrix-colo-'));
  const rand = rng(seed);
  const dstSock = join(dir, 'dst.sock');
  const relaySock = join(dir, 'relay.sock');
  const uri = `unix:${relaySock}`;
  let relay: FaultRelay | null = null;
  let dst: DstSide | null = null;
  let dstChild: Child | null = null;
  let srcChild: Child | null = null;
  let src: { machine: Machine; source: MigrationSource; options: MigrationOptions } | null = null;
  let qmp: { server: QmpServer<Ctx>; path: string } | null = null;
  let qmpClient: net.Socket | null = null;
  const paramsAfter = { 'x-checkpoint-delay': 100 };
  const secondary = () => dst!.destination.colo.secondary;
  try {
    if (fault.name === 'kill-destination') dstChild = await startChild({ role: 'destination', uri: `unix:${dstSock}`, caps: [] });
    else dst = await newDestination(`unix:${dstSock}`, []);
    relay = await FaultRelay.listen(relaySock, dstSock);
    let d1 = '';
    let holdStart = 0;
    /** the secondary's complete checkpoints when the fault hit */
    let cpBefore = -1;
    if (fault.name === 'kill-source') {
      const sc = await startChild({ role: 'source', uri, caps: COLO_CAPS, phase: COLO_ROW });
      srcChild = sc;
      for (;;) {
        const line = JSON.parse(await withTimeout(sc.nextLine(), 30000, () => `the primary child (${sc.stderr.join('')})`)) as { d1?: string; hold?: number; hit?: string; at?: number };
        if (line.d1) {
          d1 = line.d1;
          // the standby runs ahead of the checkpoint, writing pages of its own
          await dst!.machine.start();
        }
        if (line.hold !== undefined) {
          cpBefore = secondary()!.checkpoints;
          holdStart = line.hold;
          relay.hold(line.hold);
          sc.child.stdin!.write('go\n');
        }
        if (line.hit) {
          killNow(sc.child);
          // what the dead primary had handed to its socket reaches the secondary up to a random byte
          const off = holdStart + Math.floor(rand() * (line.at! - holdStart));
          res.detail = `the secondary got ${off - holdStart} of the ${line.at! - holdStart} bytes of the checkpoint`;
          relay.truncate(off);
          relay.release();
          break;
        }
      }
      await sc.exited;
    } else {
      const machine = await Machine.create({ ...GUEST });
      await machine.stop();
      const options = newOptions(COLO_CAPS, COLO_PARAMS);
      const aim = new ColoAim();
      const source: MigrationSource = new MigrationSource(machinePort(machine, { autostart: true }), options, {
        lookupFd: () => undefined,
        sections: sections(),
        log: () => undefined,
        trace: (pt: SourceTracePoint) => {
          const at = aim.step(pt);
          if (at === null) return;
          const written = bytesOut(source);
          if (at === 'start') {
            cpBefore = dst ? secondary()!.checkpoints : -1;
            if (fault.name === 'truncate' || fault.name === 'flip') {
              holdStart = written;
              relay!.hold(written);
            }
            return;
          }
          switch (fault.name) {
            case 'truncate':
            case 'flip': {
              const off = holdStart + Math.floor(rand() * (written - holdStart));
              res.detail = `byte ${off - holdStart} of the ${written - holdStart} of the checkpoint (vmstate-send, vmstate-size, the stream)`;
              if (fault.name === 'truncate') relay!.truncate(off);
              else relay!.flip(off);
              relay!.release();
              break;
            }
            case 'kill-destination':
              killNow(dstChild!.child);
              break;
            case 'cancel':
              source.cancel();
              assert.equal(source.status, 'colo', 'migrate_cancel leaves the status colo (QEMU 7.2)');
              break;
            case 'cut':
              relay!.cut();
              break;
            case 'qmp-gone':
              leaveMidCommand(qmpClient!, paramsAfter);
              break;
          }
        },
      });
      src = { machine, source, options };
      ({ qmp, client: qmpClient } = await qmpGoneSetup(fault.name, dir, src));
      source.start(uri);
      d1 = (await aim.prelude(machine, source, async () => void (await dst?.machine.start()))).d1;
      await until(() => aim.sent, 20000, () => `the fault's checkpoint (source ${source.status})`);
    }

    // ---- the known state
    const primary = src?.source.colo.session ?? null;
    const side = (status: string, runState: string, colo: ColoService): string => {
      const st = colo.status();
      return `${status} (${runState}, ${st['x-checkpoints']} checkpoints${st['x-error'] ? `, ${st['x-error']}` : ''})`;
    };
    const desc = (): string =>
      `primary ${src ? side(src.source.status, src.machine.runState, src.source.colo) : 'killed'}, ` +
      `secondary ${dst ? side(dst.destination.status, dst.machine.runState, dst.destination.colo) : 'killed'}`;
    let owner: Machine;
    if (!src) {
      // the primary died in the checkpoint: the secondary reports it, then takes over from D1
      await until(() => secondary()?.error != null, 10000, () => `the secondary to see the primary gone: ${desc()}`);
      assert.equal(secondary()!.checkpoints, cpBefore, `the secondary completed no checkpoint after the fault: ${desc()}`);
      dst!.destination.colo.lostHeartbeat();
      await withTimeout(dst!.destination.whenDone(), 10000, () => `the secondary's failover: ${desc()}`);
      assert.equal(dst!.destination.status, 'completed', desc());
      assert.equal(dst!.machine.runState, 'paused', `the secondary runs as the primary was at its last checkpoint (paused): ${desc()}`);
      assert.equal((await dst!.machine.digest()).digest, d1, `the secondary is at the last complete checkpoint, not half of the next: ${desc()}`);
      await dst!.machine.start();
      res.outcome = 'secondary took over';
      owner = dst!.machine;
    } else {
      const { source, machine } = src;
      // the checkpoint ends (a flipped byte inside a page passes: the secondary loads it), or the primary sees the fault
      await until(() => primary!.error != null || (dst !== null && secondary()!.checkpoints > cpBefore), 10000, () => `the checkpoint to end: ${desc()}`);
      if (primary!.error == null) {
        assert.ok(fault.name === 'flip' || fault.name === 'qmp-gone', `the session survived the fault: ${desc()}`);
        if (fault.name === 'qmp-gone') {
          // the command of the client that left still ran (and asked for a checkpoint), and the monitor serves others
          assert.equal(src.options.get('x-checkpoint-delay'), paramsAfter['x-checkpoint-delay'], 'migrate-set-parameters of the client that left took effect');
          (await rawClient(qmp!.path)).destroy();
        }
        // the pair goes on: one more checkpoint completes
        const n = secondary()!.checkpoints;
        source.colo.checkpointDelayChanged();
        await until(() => secondary()!.checkpoints > n, 10000, () => `a checkpoint after the fault: ${desc()}`);
        assert.equal(source.status, 'colo', desc());
        res.outcome = fault.name === 'flip' ? 'flip not seen by the format' : 'the pair goes on';
      } else {
        // the primary saw the fault: it reports it and keeps the guest stopped until a failover
        await until(() => machine.runState === 'colo', 10000, () => `the primary to stop its guest (fail-stop): ${desc()}`);
        assert.equal(source.status, 'colo', `the primary waits for a failover: ${desc()}`);
        if (dst) assert.equal(secondary()!.checkpoints, cpBefore, `the secondary completed nothing of the faulted checkpoint: ${desc()}`);
        res.outcome = 'primary runs on';
      }
      // x-colo-lost-heartbeat on the primary: it runs alone
      source.colo.lostHeartbeat();
      await withTimeout(source.whenIdle(), 10000, () => `the primary's failover: ${desc()}`);
      assert.equal(source.status, 'completed', desc());
      assert.equal(machine.runState, 'running', desc());
      if (dst && res.outcome === 'primary runs on') {
        // the secondary left behind holds D1: told to take over now, it would run from there
        await until(() => secondary()?.error != null, 10000, () => `the secondary to see the link gone: ${desc()}`);
        dst.destination.colo.lostHeartbeat();
        await withTimeout(dst.destination.whenDone(), 10000, () => `the secondary's failover: ${desc()}`);
        assert.equal(dst.machine.runState, 'paused', desc());
        assert.equal((await dst.machine.digest()).digest, d1, `the secondary left behind is at the last complete checkpoint: ${desc()}`);
      }
      owner = machine;
    }
    await workloadDone(owner);
    assert.equal((await owner.digest()).digest, REF, `the owner of the guest reaches the reference memory: ${desc()}`);
    res.detail = [desc(), res.detail].filter(Boolean).join('; ');

    // ---- a new migration afterwards, of the owner
    await migrateAgain(owner, dir, false);
  } finally {
    await tearDown({ srcChild, dstChild, src, dst, qmp, relay });
    rmSync(dir, { recursive: true, force: true });
  }
  await listenerGone(dstSock);
  return res;
}

/** The qmp-gone cells: a monitor over the source, and the client that will leave (none in other cells). */
async function qmpGoneSetup(
  fault: FaultName,
  dir: string,
  src: { machine: Machine; source: MigrationSource; options: MigrationOptions },
): Promise<{ qmp: { server: QmpServer<Ctx>; path: string } | null; client: net.Socket | null }> {
  if (fault !== 'qmp-gone') return { qmp: null, client: null };
  const qmp = await monitor(dir, src.machine, src.options, src.source);
  return { qmp, client: await rawClient(qmp.path) };
}

/** The qmp-gone fault: query-migrate and migrate-set-parameters, the socket closed before the replies. */
function leaveMidCommand(client: net.Socket, params: Record<string, number>): void {
  client.write(`{"execute":"query-migrate"}\n{"execute":"migrate-set-parameters","arguments":${JSON.stringify(params)}}\n`, () => client.destroy());
}

/** What a cell started, torn down: the children killed and reaped, then the engines, the monitor, the machines, the relay. */
async function tearDown(c: {
  srcChild: Child | null;
  dstChild: Child | null;
  src: { machine: Machine; source: MigrationSource } | null;
  dst: DstSide | null;
  qmp: { server: QmpServer<Ctx> } | null;
  relay: FaultRelay | null;
}): Promise<void> {
  for (const k of [c.srcChild, c.dstChild]) if (k && k.child.exitCode === null) k.child.kill('SIGKILL');
  await c.srcChild?.exited;
  await c.dstChild?.exited;
  // (a COLO primary stops where it is; a migration in flight is cancelled)
  c.src?.source.shutdown();
  await c.src?.source.whenIdle();
  c.dst?.destination.close();
  await c.dst?.destination.whenDone();
  await c.qmp?.server.close();
  await c.src?.machine.destroy();
  await c.dst?.machine.destroy();
  await c.relay?.close();
}

/** The destination's socket no longer accepts connections. */
async function listenerGone(path: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const c = net.connect(path);
    c.on('connect', () => reject(new Error('the destination still listens')));
    c.on('error', () => resolve());
  });
}

function cellText(r: Result | undefined): string {
  if (!r) return 'not run';
  if (r.na) return `n/a: ${r.na}`;
  if (r.error) return `**FAILED**: ${r.error.split('\n')[0]}`;
  return r.outcome!;
}

function writeDoc(): void {
  const cols = FAULTS.map((f) => f.name);
  const passed = results.filter((r) => r.outcome).length;
  const failed = results.filter((r) => r.error).length;
  const na = results.filter((r) => r.na).length;
  const lines = [
    `**${passed} cells passed, ${failed} failed, ${na} not applicable** (of ${ROWS.length} phases × ${FAULTS.length} faults).`,
    '',
    `| phase | ${cols.join(' | ')} |`,
    `|---|${cols.map(() => '---').join('|')}|`,
    ...ROWS.map((p) => `| ${p.name} | ${cols.map((c) => cellText(results.find((r) => r.phase === p.name && r.fault === c))).join(' | ')} |`),
    '',
    'Phases:',
    '',
    ...ROWS.map((p) => `- **${p.name}** (${p.caps.join(', ')}): ${p.what}`),
    '',
    'Faults:',
    '',
    ...FAULTS.map((f) => `- **${f.name}**: ${f.what}`),
  ];
  writeSection('matrix', lines.join('\n'));
}

describe('the fault matrix (docs/reliability.md)', () => {
  before(async () => {
    BASE_DIR = mkdtempSync(join(tmpdir(), 'ferry-matrix-base-'));
    baseImage(baseImagePath());
    REF_DISK = await referenceDiskDigest(baseImagePath(), join(BASE_DIR, 'ref.raw'));
    REF = await referenceDigest();
    if (!ROOT) tmpfsWorks = 'needs root to mount a small tmpfs (run as root, as CI does)';
    else {
      const probe = mkdtempSync(join(tmpdir(), 'ferry-tmpfs-'));
      try {
        execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe], { stdio: 'pipe' });
        execFileSync('umount', [probe]);
      } catch (e) {
        tmpfsWorks = `mounting a tmpfs failed here: ${(e as Error).message.split('\n')[0]}`;
      } finally {
        rmSync(probe, { recursive: true, force: true });
      }
    }
  });
  after(() => {
    if (BASE_DIR) rmSync(BASE_DIR, { recursive: true, force: true });
    if (results.length === ROWS.length * FAULTS.length) writeDoc();
  });

  let seed = 1;
  for (const row of ROWS) {
    for (const fault of FAULTS) {
      const cellSeed = seed++;
      it(`${row.name} × ${fault.name}`, async (t) => {
        const na = fault.notApplicable?.(row) ?? null;
        if (na) {
          results.push({ phase: row.name, fault: fault.name, na });
          t.skip(na);
          return;
        }
        try {
          // what the process holds right before this cell, compared once it is torn down
          const before = snapshot();
          const r = row.colo ? await runColoCell(fault, cellSeed) : await runCell(row as PhaseDef, fault, cellSeed);
          const leak = await leaked(before);
          assert.equal(leak, null, `resources left over: ${leak}`);
          results.push(r);
          t.diagnostic(`${r.outcome}: ${r.detail ?? ''}`);
        } catch (e) {
          results.push({ phase: row.name, fault: fault.name, error: (e as Error).message });
          throw e;
        }
      });
    }
  }
});
