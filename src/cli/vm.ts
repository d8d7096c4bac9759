/**
 * `ferry vm`: one virtual machine process, driven over QMP like
 * qemu-system. See vm-args.ts for the command line.
 */
import { keepFreedHeap } from '../base/native.js';
import { parseSize } from '../base/size.js';
import { handlers } from '../commands/handlers.js';
import type { Ctx, UserObject, VmServices } from '../commands/context.js';
import { addObject } from '../commands/objects.js';
import { NbdService } from '../commands/nbd.js';
import { COMMANDS } from '../generated/qapi-commands.js';
import { QapiEvents } from '../generated/qapi-events.js';
import { DiskWorkloadError, DriveError, Machine, parseDiskWorkload, parseFill, parseWorkload, type SerialConfig } from '../machine/index.js';
import {
  ColoService,
  MigrationDestination,
  MigrationObserver,
  MigrationOptions,
  MigrationSource,
  MultifdWorkers,
  BLOCK_DRIVES_SECTION,
  BLOCK_SECTION,
  RAM_SECTION,
  SectionRegistry,
  machinePort,
  type TlsDeps,
} from '../migration/index.js';
import { QmpError } from '../qapi/errors.js';
import { startMetrics } from '../metrics/prometheus.js';
import { QmpServer } from '../qmp/index.js';
import { coloDisks } from './colo-disks.js';
import { parseVmArgs, UsageError } from './vm-args.js';

export const FERRY_VERSION = { qemu: { major: 2, minor: 10, micro: 0 }, package: 'ferry-0.1.0' };

function parseSerial(s: string): SerialConfig {
  if (s === 'none' || s === 'null') return { kind: 'none' };
  if (s === 'stdio' || s === 'stdout') return { kind: 'stdout' };
  if (s.startsWith('file:')) return { kind: 'file', path: s.slice(5) };
  throw new UsageError(`-serial ${s}: expected none, stdio or file:PATH`);
}

/** FERRY_TLS_HANDSHAKE_TIMEOUT_MS overrides the TLS handshake time limit (docs/tls.md). */
function handshakeTimeout(): number | undefined {
  const v = process.env.FERRY_TLS_HANDSHAKE_TIMEOUT_MS;
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`FERRY_TLS_HANDSHAKE_TIMEOUT_MS=${v}: expected a positive number of milliseconds`);
  return n;
}

export async function main(argv: string[]): Promise<number> {
  let vm: VmServices;
  let server: QmpServer<Ctx>;
  // an incoming stream's socket buffers: keep their heap instead of handing it back and faulting it in again
  keepFreedHeap();
  try {
    const a = parseVmArgs(argv);
    let ramSize = parseSize(a.ramSize);
    // -object memory-backend-ram,id=m,size=16M -machine memory-backend=m
    const objects = new Map<string, UserObject>();
    for (const o of a.objects) {
      const props: Record<string, unknown> = { ...o.props };
      if (o.qomType === 'memory-backend-ram' && typeof props.size === 'string') props.size = parseSize(props.size);
      try {
        addObject(objects, { qomType: o.qomType, id: o.id, props });
      } catch (e) {
        throw new UsageError(`-object ${o.qomType},id=${o.id}: ${(e as Error).message}`);
      }
    }
    if (a.memoryBackend) {
      const be = objects.get(a.memoryBackend);
      if (!be || be.qomType !== 'memory-backend-ram') {
        throw new UsageError(`Memory backend '${a.memoryBackend}' not found`);
      }
      ramSize = be.props.size as number;
    }
    const prealloc = a.memPrealloc || (a.memoryBackend !== undefined && objects.get(a.memoryBackend)!.props.prealloc === true);
    let diskWorkload;
    if (a.diskWorkload !== undefined) {
      try {
        diskWorkload = parseDiskWorkload(a.diskWorkload);
      } catch (e) {
        throw new UsageError(`-disk-workload ${a.diskWorkload}: ${(e as Error).message}`);
      }
    }
    const machine = await Machine.create({
      ramSize,
      smp: a.smp,
      name: a.name,
      machineType: a.machineType,
      memoryBackendId: a.memoryBackend,
      workload: parseWorkload(a.workload),
      fill: parseFill(a.fill),
      startPaused: a.startPaused,
      incoming: a.incoming !== undefined,
      prealloc,
      serial: parseSerial(a.serial),
      drives: a.drives.map((d) => d.config),
      diskWorkload,
    }).catch((e: unknown) => {
      if (e instanceof DriveError) throw new UsageError(`-drive ${a.drives[e.drive]!.spec}: ${e.message}`);
      if (e instanceof DiskWorkloadError) throw new UsageError(`-disk-workload ${a.diskWorkload!}: ${e.message}`);
      throw e;
    });
    const options = new MigrationOptions();
    const fds = new Map<string, number>();
    const lookupFd = (name: string) => fds.get(name);
    let quitting = false;
    // -S, or `stop` during an incoming migration, keeps the guest paused after the load
    const incomingRun = { autostart: !a.startPaused };
    const port = machinePort(machine, incomingRun);
    // the live sections this VM migrates besides its devices: RAM, and with
    // the `block` capability the drives (QEMU's block section, and Ferry's
    // list of the drives for a Ferry destination to check first)
    const sections = new SectionRegistry([RAM_SECTION, BLOCK_SECTION, BLOCK_DRIVES_SECTION]);
    const log = (msg: string) => process.stderr.write(`ferry: ${msg}\n`);
    // QEMU warns too (and then restricts writes to block 0, which Ferry does not)
    for (const d of machine.drives.list) {
      if (d.probed && d.image.format === 'raw') log(`warning: Image format was not specified for '${d.file}' and probing guessed raw.`);
    }
    machine.on('disk-workload-error', (e: Error) => log(`disk workload stopped: ${e.message}`));
    machine.on('drive-error', (drive: string, e: Error) => log(`drive ${drive}: ${e.message}`));
    machine.on('replication-error', (drive: string, e: Error) => log(`block replication on drive ${drive}: ${e.message}`));
    // tls-creds names an object: its loaded credentials, or 'other' for an object of another kind
    const tls: TlsDeps = {
      lookup: (id) => {
        const o = objects.get(id);
        return o === undefined ? undefined : (o.tls ?? 'other');
      },
      handshakeTimeoutMs: handshakeTimeout(),
    };
    // COLO: one per VM, shared by its outgoing (primary) and incoming (secondary) migrations
    const colo = new ColoService();
    // multifd's channel workers start when the capability is turned on, not when a migration begins
    const multifdWorkers = new MultifdWorkers();
    options.onChange(() => {
      if (options.capability('multifd')) multifdWorkers.warm(options.get('multifd-channels'));
      else void multifdWorkers.release();
    });
    // its replicated drives follow its checkpoints and failovers
    colo.addReplication(coloDisks(machine));
    const source = new MigrationSource(port, options, {
      lookupFd,
      qemuCompatible: a.qemuCompat,
      sendConfiguration: a.sendConfiguration,
      tls,
      sections,
      log,
      colo,
      multifdWorkers,
    });
    const destination = new MigrationDestination(port, options, {
      lookupFd, log, sections, tls, colo, configuration: a.sendConfiguration, multifdWorkers,
    });
    const observe = new MigrationObserver({ source, destination, options, ram: () => machine.ram, faultStats: () => machine.faultStats() });
    vm = {
      machine,
      options,
      objects,
      fds,
      nbd: new NbdService(),
      log,
      source,
      destination,
      observe,
      colo,
      incomingMode: a.incoming === undefined ? 'none' : a.incoming === 'defer' ? 'defer' : 'uri',
      commandNames: [...COMMANDS.keys()],
      version: FERRY_VERSION,
      get autostart() {
        return incomingRun.autostart;
      },
      set autostart(v: boolean) {
        incomingRun.autostart = v;
      },
      requestQuit() {
        if (quitting) return;
        quitting = true;
        // as QEMU 7.2: the event goes out before quit's reply
        events.SHUTDOWN({ guest: false, reason: 'host-qmp-quit' });
        setTimeout(() => void shutdown(0), 20);
      },
    };

    server = new QmpServer<Ctx>({
      commands: COMMANDS,
      handlers,
      makeContext: (conn) => ({ vm, conn }),
      version: FERRY_VERSION,
      onDrop: (conn, backlog) => log(`QMP client ${conn.peer} dropped: ${backlog} bytes of output it did not read`),
    });
    const events = new QapiEvents((name, data) => server.broadcast(name, data));
    machine.on('runstate', (now: string, old: string) => {
      observe.runState(now, old);
      if (old === 'running') events.STOP();
      if (now === 'running') events.RESUME();
    });
    source.on('status', (status) => {
      if (options.capability('events')) events.MIGRATION({ status });
    });
    source.on('pass', (pass) => {
      if (options.capability('events')) events.MIGRATION_PASS({ pass });
    });
    destination.on('status', (status) => {
      if (status === 'setup' || options.capability('events')) events.MIGRATION({ status });
    });
    colo.on('exit', (mode, reason) => events.COLO_EXIT({ mode, reason }));

    const shutdown = async (code: number) => {
      try {
        source.shutdown();
        destination.close();
        await vm.nbd.shutdown().catch(() => undefined);
        await server.close();
        await machine.destroy();
      } finally {
        process.exit(code);
      }
    };
    const onSignal = (): void => {
      if (quitting) return;
      quitting = true;
      events.SHUTDOWN({ guest: false, reason: 'host-signal' });
      void shutdown(0);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    process.on('SIGHUP', onSignal);

    // like QEMU, the incoming listener exists before the monitor answers:
    // a client that got the greeting may connect to it at once
    if (a.incoming !== undefined && a.incoming !== 'defer') {
      await destination.start(a.incoming);
    }
    for (const spec of a.qmp) await server.listen(spec);
    if (a.metrics !== undefined) {
      const m = await startMetrics(a.metrics, { source, destination, observe, name: a.name, faultStats: () => machine.faultStats() });
      log(`metrics on ${m.url}`);
    }
    return -1; // keep running
  } catch (e) {
    const msg = e instanceof QmpError ? e.desc : e instanceof Error ? e.message : String(e);
    process.stderr.write(`ferry vm: ${msg}\n`);
    // vCPU workers or listeners may already exist and would keep the process alive
    process.exit(1);
  }
}
