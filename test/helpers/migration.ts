/**
 * One declarative migration: describe the guest, the two sides, the
 * transport, what to do while it runs and what to expect; runMigration()
 * starts the processes, configures them, migrates, waits for both ends,
 * checks the expectations and returns everything for further asserts.
 *
 *   const m = await runMigration({
 *     guest: { mem: '64M', fill: 'random,seed=3', workload: 'stress,rate=4M,seed=7' },
 *     capabilities: ['events'],
 *     expect: { events: { source: ['setup', 'active', 'completed'] } },
 *   });
 *   assert.equal(m.info.ram.remaining, 0);
 *
 * Defaults, those of most tests: unix transport in a fresh temp dir, the
 * source at max-bandwidth 0, a `-S` destination (so its digest is the
 * switchover digest), both sides completed, the source postmigrate, the
 * destination paused, digests equal, both quit at the end.
 */
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { join } from 'node:path';
import { assertSameRam, freePort, pmem, startQemu } from './qemu.js';
import { migrationEvents, shq, startVm, tempDir, waitFor, waitMigration, type QmpProcess, type VmHandle } from './vm.js';

/** The machine and what runs in it. */
export interface Guest {
  /** -m (both sides) */
  mem?: string;
  /** -smp (both sides) */
  smp?: number;
  /** machine arguments for both sides, e.g. -machine none,memory-backend=m -object ... */
  machine?: string[];
  /** -fill (source only unless the destination says so) */
  fill?: string;
  /** -workload (source only unless the destination says so) */
  workload?: string;
}

export interface Side extends Guest {
  /** process name (its QMP socket is DIR/NAME.qmp); default src / dst */
  name?: string;
  /** more arguments for this side (QEMU: all of them) */
  args?: string[];
  /** migrate-set-parameters on this side (a source the harness starts: default max-bandwidth 0) */
  parameters?: Record<string, unknown>;
  /** a QEMU instead of a `ferry vm` (only `args` describe it) */
  qemu?: boolean;
}

export interface SourceSide extends Side {
  /** use this running process as the source: not started, not quit by the harness */
  vm?: VmHandle;
}

export interface DestinationSide extends Side {
  /** capabilities of the destination; default those of `capabilities` that must be on both sides */
  capabilities?: string[];
  /** -S (default true for a ferry vm, false for QEMU) */
  paused?: boolean;
  /** start with `-incoming defer`, set capabilities, then migrate-incoming */
  defer?: boolean;
}

export interface Endpoints {
  /** what the source's migrate gets */
  uri: string;
  /** what the destination's -incoming gets (default: uri) */
  incoming?: string;
}

/**
 * unix: DIR/mig.sock; tcp / tcp6: a free port on 127.0.0.1 / ::1; file: the
 * source writes `exec:cat > DIR/state.mig` and the destination starts once the
 * source completed, with `-incoming exec:cat FILE`; fd: one end of a unix
 * socket connection inherited by each side as fd 3; or any pair of URIs.
 */
export type Transport = 'unix' | 'tcp' | 'tcp6' | 'file' | 'fd' | Endpoints | ((dir: string) => Endpoints | Promise<Endpoints>);

export type Status = 'completed' | 'failed' | 'cancelled';

export interface Expect {
  /** the source's final status (default completed); ended: any of them; null: do not wait for it */
  source?: Status | 'ended' | null;
  /** the destination's (default completed when the source is expected to complete, else not waited for) */
  destination?: Status | null;
  /** the destination had already ended when the source did: read once, right then, instead of polled */
  destinationEndedFirst?: boolean;
  /** the source's run state at the end (default postmigrate when completed); null: not checked */
  sourceRunState?: string | null;
  /** the destination's (default paused with -S, running without, when completed); null: not checked */
  destinationRunState?: string | null;
  /** digests equal (default: both ferry, both completed, destination paused) */
  digests?: boolean;
  /** compare this many bytes of guest RAM by pmemsave on both sides (QEMU has no digest) */
  sameRam?: number;
  /** the drives' digests equal (x-query-block-digest; both ferry) */
  sameDisks?: boolean;
  /** the MIGRATION event statuses of each side, in order (needs the events capability) */
  events?: { source?: string[]; destination?: string[] };
  /**
   * how long run states and events may take to settle after query-migrate
   * ended, for all three or each (default 0: they must be there at once)
   */
  settleMs?: number | { sourceRunState?: number; destinationRunState?: number; events?: number };
}

export interface MigrationSpec {
  guest?: Guest;
  source?: SourceSide;
  /** null: no destination (a file, a fake listener, ...) */
  destination?: DestinationSide | null;
  /** capabilities of the source; compress and postcopy-ram go to the destination too */
  capabilities?: string[];
  /** more arguments of `migrate` (blk, inc) */
  migrate?: Record<string, unknown>;
  transport?: Transport;
  /** the directory (default: a new temp dir named with tempPrefix) */
  dir?: string;
  tempPrefix?: string;
  /** after both sides are set up, before migrate */
  before?: (m: Migration) => unknown;
  /** right after migrate returned */
  during?: (m: Migration) => unknown;
  /** after the expectations were checked, before the quit */
  after?: (m: Migration) => unknown;
  expect?: Expect;
  /** wait for the source this long (default 60 s) */
  timeoutMs?: number;
  /** and for the destination (default timeoutMs) */
  destinationTimeoutMs?: number;
  /** quit both sides at the end (default true; a reused source is never quit) */
  quit?: boolean;
}

export interface Migration {
  dir: string;
  uri: string;
  incoming: string;
  /** the stream file of the file transport */
  file?: string;
  src: QmpProcess;
  /** undefined until started (file transport: after the source completed), and with destination null */
  dst?: QmpProcess;
  /** what `migrate` returned */
  migrateReturn?: unknown;
  /** the final query-migrate of the source ({} until waited for) */
  info: Record<string, any>;
  /** the final query-migrate of the destination */
  dinfo?: Record<string, any>;
  /** MIGRATION event statuses at the end */
  events: { source: string[]; destination: string[] };
  /** Date.now() when migrate was sent and when each side's end was seen */
  times: { migrate: number; sourceEnded?: number; destinationEnded?: number };
  /** the destination, which the caller knows exists */
  readonly d: QmpProcess;
  /** quit what the harness started */
  quit(): Promise<void>;
}

/** The capabilities QEMU wants on both sides. */
const BOTH_SIDES = new Set(['compress', 'postcopy-ram']);

export function capabilities(names: string[], state = true): { capabilities: { capability: string; state: boolean }[] } {
  return { capabilities: names.map((capability) => ({ capability, state })) };
}

/** The `ferry vm` arguments of a guest. */
export function guestArgs(g: Guest): string[] {
  return [
    ...(g.mem ? ['-m', g.mem] : []),
    ...(g.smp ? ['-smp', String(g.smp)] : []),
    ...(g.machine ?? []),
    ...(g.fill ? ['-fill', g.fill] : []),
    ...(g.workload ? ['-workload', g.workload] : []),
  ];
}

async function endpoints(t: Transport, dir: string): Promise<Endpoints & { file?: string }> {
  if (typeof t === 'function') return t(dir);
  if (typeof t === 'object') return t;
  switch (t) {
    case 'unix':
      return { uri: `unix:${join(dir, 'mig.sock')}` };
    case 'tcp':
      return { uri: `tcp:127.0.0.1:${await freePort()}` };
    case 'tcp6':
      return { uri: `tcp:[::1]:${await freePort('::1')}` };
    case 'file': {
      const file = join(dir, 'state.mig');
      return { uri: `exec:cat > ${shq(file)}`, incoming: `exec:cat ${shq(file)}`, file };
    }
    case 'fd':
      return { uri: 'fd:3' };
  }
}

/** A connected pair of unix sockets (one for each side of the fd transport). */
async function socketPair(dir: string): Promise<[net.Socket, net.Socket]> {
  const path = join(dir, 'pair.sock');
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(path, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const a = net.connect(path);
  await new Promise<void>((r) => a.once('connect', () => r()));
  const b = await accepted;
  server.close();
  return [a, b];
}

async function start(side: Side, dir: string, name: string, args: string[], extra?: net.Socket): Promise<QmpProcess> {
  if (side.qemu) return startQemu({ dir, name, args });
  return startVm({ dir, name, args, extraStdio: extra ? [extra] : undefined });
}

/** The run state `want`, at once or within ms. */
async function runState(vm: QmpProcess, want: string, ms: number, what: string): Promise<void> {
  if (ms > 0) await waitFor(async () => (await vm.status()) === want, ms, `${what} run state ${want}`).catch(() => undefined);
  assert.equal(await vm.status(), want, `${what} run state\n${vm.stderr}`);
}

async function eventsAre(vm: QmpProcess, want: string[], ms: number, what: string): Promise<void> {
  if (ms > 0) await waitFor(() => migrationEvents(vm).at(-1) === want.at(-1), ms, `${what} MIGRATION ${want.at(-1)} event`).catch(() => undefined);
  assert.deepEqual(migrationEvents(vm), want, `${what} MIGRATION events`);
}

export async function runMigration(spec: MigrationSpec): Promise<Migration> {
  const guest = spec.guest ?? {};
  const s = spec.source ?? {};
  const d = spec.destination === null ? null : (spec.destination ?? {});
  const e = spec.expect ?? {};
  const timeoutMs = spec.timeoutMs ?? 60000;
  const dir = spec.dir ?? tempDir(spec.tempPrefix);
  const ep = await endpoints(spec.transport ?? 'unix', dir);
  const pair = spec.transport === 'fd' ? await socketPair(dir) : undefined;
  const incoming = ep.incoming ?? ep.uri;
  const fileTransport = spec.transport === 'file';
  const srcCaps = spec.capabilities ?? [];
  const dstCaps = d?.capabilities ?? srcCaps.filter((c) => BOTH_SIDES.has(c));
  const paused = d ? (d.paused ?? !d.qemu) : false;

  const srcArgs = s.qemu
    ? (s.args ?? [])
    : [...guestArgs({ ...guest, ...s }), ...(s.args ?? [])];
  const dstArgs = (inc: string): string[] =>
    d!.qemu
      ? [...(d!.args ?? []), '-incoming', inc]
      : [...guestArgs({ ...guest, fill: undefined, workload: undefined, ...d }), ...(d!.args ?? []), ...(paused ? ['-S'] : []), '-incoming', inc];

  const started: QmpProcess[] = [];
  const src = s.vm ?? (await start(s, dir, s.name ?? 'src', srcArgs, pair?.[0]));
  if (!s.vm) started.push(src);
  const m: Migration = {
    dir,
    uri: ep.uri,
    incoming,
    file: ep.file,
    src,
    info: {},
    events: { source: [], destination: [] },
    times: { migrate: 0 },
    get d(): QmpProcess {
      assert.ok(this.dst, 'the migration has a destination');
      return this.dst;
    },
    async quit() {
      await Promise.all(started.map((p) => p.quit()));
    },
  };
  const startDestination = async (): Promise<void> => {
    const dst = await start(d!, dir, d!.name ?? 'dst', dstArgs(d!.defer ? 'defer' : incoming), pair?.[1]);
    started.push(dst);
    m.dst = dst;
    if (dstCaps.length) await dst.execute('migrate-set-capabilities', capabilities(dstCaps));
    if (d!.parameters) await dst.execute('migrate-set-parameters', d!.parameters);
    if (d!.defer) await dst.execute('migrate-incoming', { uri: incoming });
  };

  try {
    if (d && !fileTransport) await startDestination();
    if (pair) for (const sock of pair) sock.destroy(); // the children own the descriptors now
    if (srcCaps.length) await src.execute('migrate-set-capabilities', capabilities(srcCaps));
    const params = s.parameters ?? (s.vm ? {} : { 'max-bandwidth': 0 });
    if (Object.keys(params).length) await src.execute('migrate-set-parameters', params);
    await spec.before?.(m);
    m.times.migrate = Date.now();
    m.migrateReturn = await src.execute('migrate', { uri: ep.uri, ...spec.migrate });
    await spec.during?.(m);

    const srcWant = e.source === undefined ? 'completed' : e.source;
    const both = (): string => `\nsource stderr: ${src.stderr}\ndestination stderr: ${m.dst?.stderr ?? ''}`;
    if (srcWant) {
      m.info = await waitMigration(src, ['completed', 'failed', 'cancelled'], timeoutMs);
      m.times.sourceEnded = Date.now();
      if (srcWant !== 'ended') assert.equal(m.info.status, srcWant, `source: ${JSON.stringify(m.info)}${both()}`);
    }
    if (d && fileTransport) await startDestination();
    const dstWant = e.destination === undefined ? (srcWant === 'completed' && d ? 'completed' : null) : e.destination;
    if (dstWant) {
      m.dinfo = e.destinationEndedFirst
        ? await m.d.execute<Record<string, any>>('query-migrate')
        : await waitMigration(m.d, ['completed', 'failed', 'cancelled'], spec.destinationTimeoutMs ?? timeoutMs);
      m.times.destinationEnded = Date.now();
      assert.equal(m.dinfo.status, dstWant, `destination: ${JSON.stringify(m.dinfo)}${both()}`);
    }

    const all = typeof e.settleMs === 'number' ? e.settleMs : 0;
    const settle = { sourceRunState: all, destinationRunState: all, events: all, ...(typeof e.settleMs === 'object' ? e.settleMs : {}) };
    const srcState = e.sourceRunState === undefined ? (srcWant === 'completed' ? 'postmigrate' : null) : e.sourceRunState;
    if (srcState) await runState(src, srcState, settle.sourceRunState, 'source');
    const dstState =
      e.destinationRunState === undefined ? (dstWant === 'completed' ? (paused ? 'paused' : 'running') : null) : e.destinationRunState;
    if (dstState) await runState(m.d, dstState, settle.destinationRunState, 'destination');
    if (e.events?.source) await eventsAre(src, e.events.source, settle.events, 'source');
    if (e.events?.destination) await eventsAre(m.d, e.events.destination, settle.events, 'destination');
    m.events = { source: migrationEvents(src), destination: m.dst ? migrationEvents(m.dst) : [] };

    const ferryBoth = !s.qemu && !!d && !d.qemu;
    if (e.digests ?? (ferryBoth && srcWant === 'completed' && dstWant === 'completed' && paused)) {
      assert.equal(await m.d.digest(), await src.digest(), 'destination RAM equals the source at switchover');
    }
    if (e.sameDisks) {
      const [a, b] = await Promise.all([m.d.execute<{ digest: string }>('x-query-block-digest'), src.execute<{ digest: string }>('x-query-block-digest')]);
      assert.deepEqual(a, b, 'the destination\'s drives equal the source\'s at switchover');
    }
    if (e.sameRam) {
      assertSameRam(await pmem(m.d, dir, e.sameRam), await pmem(src, dir, e.sameRam), 'destination RAM (pmemsave) against the source');
    }

    await spec.after?.(m);
  } catch (err) {
    // what the harness started goes (the caller's source stays)
    await Promise.all(started.map((p) => p.destroy()));
    throw err;
  }
  if (spec.quit ?? true) await m.quit();
  return m;
}

/**
 * A destination loading a saved stream: `ferry vm ARGS -incoming "exec:cat
 * FILE"` (with capabilities: `-incoming defer`, migrate-set-capabilities,
 * migrate-incoming), until its query-migrate ends. The caller quits it.
 */
export async function loadStreamFile(
  file: string,
  opts: { dir: string; name?: string; args: string[]; capabilities?: string[]; timeoutMs?: number },
): Promise<{ vm: VmHandle; info: Record<string, any> }> {
  const uri = `exec:cat ${shq(file)}`;
  const caps = opts.capabilities ?? [];
  const vm = await startVm({ dir: opts.dir, name: opts.name ?? 'dst', args: [...opts.args, '-incoming', caps.length ? 'defer' : uri] });
  if (caps.length) {
    await vm.execute('migrate-set-capabilities', capabilities(caps));
    await vm.execute('migrate-incoming', { uri });
  }
  const info = await waitMigration(vm, ['completed', 'failed', 'cancelled'], opts.timeoutMs ?? 30000);
  return { vm, info };
}
