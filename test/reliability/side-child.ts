/**
 * One side of a reliability cell in a process of its own, so that the cell
 * can SIGKILL it: `node side-child.js JSON`.
 *
 *   { role: 'destination', uri, caps }  listens on uri, prints {"ready":true}
 *        (with `disk`, the block guest's: its drive is that image, made empty)
 *   { role: 'source', uri, caps, phase } migrates GUEST to uri; at the trace
 *        point where PHASES[phase] fires it prints {"hit":POINT} and freezes
 *        (the event loop blocked, its sockets open) until it is killed
 *        (with `disk`, the block guest on that image)
 *   { role: 'source', uri, caps, phase: COLO_ROW } the COLO primary of
 *        colo-cell.ts: prints {"d1":DIGEST} once its last checkpoint before
 *        the fault is complete, {"hold":OFFSET} when the fault's checkpoint
 *        is built (then waits for a line on stdin, so that the relay holds
 *        its bytes from OFFSET on), and {"hit":POINT} when its bytes were
 *        handed to the channel (with `at`, the offset after them), and
 *        freezes there
 *
 * The same engine objects as `ferry vm`, without QMP.
 */
import { Machine } from '../../src/machine/index.js';
import {
  BLOCK_DRIVES_SECTION,
  BLOCK_SECTION,
  MigrationDestination,
  MigrationOptions,
  MigrationSource,
  RAM_SECTION,
  SectionRegistry,
  machinePort,
} from '../../src/migration/index.js';
import { readSync } from 'node:fs';
import { GUEST, PHASES, SOURCE_PARAMS, blockDestination, blockGuest } from './guest.js';
import { COLO_PARAMS, COLO_ROW, ColoAim, bytesOut } from './colo-cell.js';

interface Args {
  role: 'source' | 'destination';
  uri: string;
  caps: string[];
  phase?: string;
  disk?: string;
}

// `node --test dist/test/` loads every file under test/: without arguments this does nothing
if (process.argv[2] === undefined) process.exit(0);
const args = JSON.parse(process.argv[2]) as Args;
const say = (o: unknown): void => void process.stdout.write(JSON.stringify(o) + '\n');
const options = new MigrationOptions();
options.setCapabilities(args.caps.map((c) => ({ capability: c as never, state: true })));
const sections = new SectionRegistry([RAM_SECTION, BLOCK_SECTION, BLOCK_DRIVES_SECTION]);
const log = (m: string): void => void process.stderr.write(`${args.role}: ${m}\n`);

if (args.role === 'destination') {
  const machine = await Machine.create({ ...GUEST, ...(args.disk ? blockDestination(args.disk) : {}), incoming: true, fill: undefined });
  const d = new MigrationDestination(machinePort(machine, { autostart: true }), options, { lookupFd: () => undefined, sections, log });
  await d.start(args.uri);
  say({ ready: true });
} else if (args.phase === COLO_ROW) {
  const machine = await Machine.create({ ...GUEST });
  await machine.stop();
  options.setParameters(COLO_PARAMS);
  const aim = new ColoAim();
  const source: MigrationSource = new MigrationSource(machinePort(machine, { autostart: true }), options, {
    lookupFd: () => undefined,
    sections,
    log,
    trace: (pt) => {
      const at = aim.step(pt);
      if (at === 'start') {
        say({ hold: bytesOut(source) });
        readSync(0, Buffer.alloc(64));
      } else if (at === 'sent') {
        say({ hit: pt, at: bytesOut(source) });
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
      }
    },
  });
  say({ ready: true });
  source.start(args.uri);
  const { d1 } = await aim.prelude(machine, source);
  say({ d1 });
} else {
  const machine = await Machine.create({ ...GUEST, ...(args.disk ? blockGuest(args.disk) : {}) });
  const phase = PHASES.find((p) => p.name === args.phase)!;
  options.setParameters(phase.params ?? SOURCE_PARAMS);
  let asked = false;
  const source: MigrationSource = new MigrationSource(machinePort(machine, { autostart: true }), options, {
    lookupFd: () => undefined,
    sections,
    log,
    trace: (pt) => {
      const info = source.info();
      if (phase.postcopy && pt === 'slice' && !asked) {
        asked = true;
        source.requestPostcopy();
      }
      if (phase.at(pt, info)) {
        say({ hit: pt });
        // frozen here, sockets open, until the cell's SIGKILL
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
      }
    },
  });
  source.on('status', (st) => log(`status ${st}${st === 'failed' ? `: ${source.info()['error-desc']}` : ''}`));
  say({ ready: true });
  source.start(args.uri);
}
