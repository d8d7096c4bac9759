/**
 * The incoming migration (qmp.md B.7, C.2; stream-format.md §5): listen or
 * read from the URI, validate the stream, load RAM and devices, and only when
 * everything has loaded enter the run state the stream asks for.
 *
 *   none --listen--> setup (event always) --stream--> active -> completed | failed
 *
 * A failed load leaves the guest stopped in `inmigrate`; it never runs a
 * half-loaded guest. Unlike QEMU, the process does not exit on failure: it
 * stays up so that management can read `error-desc` over QMP.
 */
import { EventEmitter } from 'node:events';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { listenIncoming, parseMigrationUri, type Channel, type IncomingListener } from '../channel/index.js';
import { DecompressPool } from '../codec/compress-pool.js';
import { devicesByKey, readDeviceSection } from '../devices.js';
import { RamLoader } from '../ram/loader.js';
import { StreamReader } from '../stream/reader.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import {
  encodeRpPong,
  encodeRpShut,
  readCommand,
  readConfiguration,
  readFooter,
  readHeader,
  readSectionPartEnd,
  readSectionStartFull,
  checkSectionVersion,
  readVmdesc,
} from '../wire/records.js';
import { MigrationClockDevice, wallClockUs } from './clock-device.js';
import { MigrationError, errorMessage } from './errors.js';
import type { MigrationOptions } from './options.js';
import type { MachinePort } from './port.js';

const S = WIRE.SECTION;

export interface DestinationDeps {
  lookupFd(name: string): number | undefined;
  now?: () => number;
  /** Called with notices such as "Expected vmdescription section, but got 0". */
  log?: (msg: string) => void;
}

export declare interface MigrationDestination {
  on(event: 'status', listener: (status: MigrationStatus) => void): this;
}

export class MigrationDestination extends EventEmitter {
  private state: MigrationStatus = 'none';
  private errorDesc: string | undefined;
  private listener: IncomingListener | null = null;
  private channel: Channel | null = null;
  private begun = false;
  private startTime = 0;
  private totalTime = 0;
  /** Source stop → guest running here, in ms (from the ferry-migration section). */
  private downtime: number | undefined;
  /** Wall-clock time (µs) at which the guest resumed here. */
  resumedAtUs: number | undefined;
  private readonly now: () => number;
  private done: Promise<void> = Promise.resolve();
  /** Bytes of the incoming stream read so far. */
  bytesReceived = 0;
  private reader: StreamReader | null = null;

  constructor(
    private readonly machine: MachinePort,
    private readonly options: MigrationOptions,
    private readonly deps: DestinationDeps,
  ) {
    super();
    this.now = deps.now ?? (() => performance.now());
  }

  get status(): MigrationStatus {
    return this.state;
  }

  /** True once start() has been called (migrate-incoming works only once). */
  get started(): boolean {
    return this.begun;
  }

  whenDone(): Promise<void> {
    return this.done;
  }

  private setStatus(s: MigrationStatus): void {
    if (this.state === s) return;
    this.state = s;
    this.emit('status', s);
  }

  /**
   * Start listening (or reading) on `uri`. Rejects with a MigrationError for
   * a bad URI or a listen error; after that, progress shows in status.
   */
  async start(uri: string): Promise<void> {
    if (this.begun) throw new MigrationError('The incoming migration has already been started');
    if (this.options.get('tls-creds') !== '') {
      throw new MigrationError('TLS migration is not supported by this build yet');
    }
    let parsed;
    try {
      parsed = parseMigrationUri(uri, 'incoming');
    } catch (e) {
      throw new MigrationError(errorMessage(e));
    }
    this.begun = true;
    try {
      this.listener = await listenIncoming(parsed, { lookupFd: this.deps.lookupFd });
    } catch (e) {
      this.begun = false;
      throw new MigrationError(errorMessage(e));
    }
    // the incoming side announces setup unconditionally (QEMU 2.10)
    this.setStatus('setup');
    this.done = this.acceptAndLoad();
  }

  /** Where we listen (tcp port 0 gets a real port), if a listener. */
  address(): ReturnType<IncomingListener['address']> | undefined {
    return this.listener?.address();
  }

  private async acceptAndLoad(): Promise<void> {
    let ch: Channel;
    try {
      ch = await this.listener!.accept();
    } catch (e) {
      this.failWith(e);
      return;
    } finally {
      this.listener?.close();
    }
    this.channel = ch;
    this.startTime = this.now();
    this.setStatus('active');
    let returnPath = false;
    try {
      returnPath = await this.load(ch);
    } catch (e) {
      if (returnPath || this.rpOpen) this.sendRp(encodeRpShut(1));
      this.failWith(e);
      ch.close();
      return;
    }
    this.totalTime = Math.round(this.now() - this.startTime);
    try {
      await this.machine.finishIncoming();
    } catch (e) {
      this.failWith(e);
      ch.close();
      return;
    }
    this.resumedAtUs = wallClockUs();
    if (this.clock.stopWallUs > 0) {
      this.downtime = Math.max(0, Math.round((this.resumedAtUs - this.clock.stopWallUs) / 1000));
    }
    if (this.rpOpen) this.sendRp(encodeRpShut(0));
    this.setStatus('completed');
    // let the SHUT reach the source before we close
    setTimeout(() => ch.close(), this.rpOpen ? 200 : 0).unref();
  }

  private rpOpen = false;
  private readonly clock = new MigrationClockDevice();

  private sendRp(msg: Buffer): void {
    const out = this.channel?.output;
    if (!out || out.destroyed || out.writableEnded) return;
    out.write(msg, () => undefined);
  }

  private failWith(e: unknown): void {
    this.errorDesc = `load of migration failed: ${errorMessage(e)}`;
    this.deps.log?.(this.errorDesc);
    this.setStatus('failed');
  }

  /** Runs the section loop to EOF. Returns whether a return path was opened. */
  private async load(ch: Channel): Promise<boolean> {
    // with `compress`, COMPRESS_PAGE records are inflated on decompress-threads workers
    const pool = this.options.capability('compress')
      ? new DecompressPool({ threads: this.options.get('decompress-threads') })
      : null;
    try {
      return await this.loadStream(ch, pool);
    } finally {
      void pool?.close();
    }
  }

  private async loadStream(ch: Channel, pool: DecompressPool | null): Promise<boolean> {
    const r = new StreamReader(ch.input);
    this.reader = r;
    await readHeader(r);
    await readConfiguration(r, this.machine.machineType);
    const ram = new RamLoader(this.machine.ram, { compress: pool !== null, decompressPool: pool ?? undefined });
    const devices = devicesByKey([...this.machine.devices, this.clock]);
    /** section id → idstr and version, from START */
    const live = new Map<number, { idstr: string; version: number }>();
    for (;;) {
      if (!r.has(1)) await r.ensure(1);
      const t = r.get8();
      switch (t) {
        case S.EOF: {
          const vm = await withTimeout(readVmdesc(r), 2000);
          if (vm && vm.notice) this.deps.log?.(vm.notice);
          this.bytesReceived = r.bytesRead;
          return this.rpOpen;
        }
        case S.START: {
          const h = await readSectionStartFull(r);
          if (h.idstr !== 'ram' || h.instanceId !== 0) {
            throw new MigrationStreamError(ERR.unknownSection(h.idstr, h.instanceId));
          }
          checkSectionVersion('ram', h.versionId, WIRE.RAM.VERSION, WIRE.RAM.VERSION);
          live.set(h.sectionId, { idstr: h.idstr, version: h.versionId });
          await ram.loadSection(r, h.versionId);
          await readFooter(r, h.idstr, h.sectionId);
          break;
        }
        case S.PART:
        case S.END: {
          const { sectionId } = await readSectionPartEnd(r);
          const sec = live.get(sectionId);
          if (!sec) throw new MigrationStreamError(ERR.unknownSectionId(sectionId));
          await ram.loadSection(r, sec.version);
          await readFooter(r, sec.idstr, sectionId);
          break;
        }
        case S.FULL:
          await readDeviceSection(r, devices);
          break;
        case S.COMMAND: {
          const c = await readCommand(r);
          if (c.cmd === 'OPEN_RETURN_PATH') {
            if (!ch.bidirectional) throw new MigrationStreamError('Unable to open the return path');
            this.rpOpen = true;
          } else if (c.cmd === 'PING') {
            if (!this.rpOpen) throw new MigrationStreamError('Received PING but no return path');
            this.sendRp(encodeRpPong(c.value));
          } else {
            throw new MigrationStreamError(`Command ${c.cmd} is not supported without postcopy-ram`);
          }
          break;
        }
        default:
          throw new MigrationStreamError(ERR.unknownSectionType(t));
      }
      this.bytesReceived = r.bytesRead;
    }
  }

  /** Abort a pending incoming migration (quit, tests). */
  close(): void {
    this.listener?.close();
    this.channel?.close();
  }

  info(): MigrationInfo {
    if (this.state === 'none') return {};
    const info: MigrationInfo = { status: this.state };
    if (this.state === 'completed') {
      info['total-time'] = this.totalTime;
      if (this.downtime !== undefined) info.downtime = this.downtime;
    } else if (this.state === 'failed' && this.errorDesc) {
      info['error-desc'] = this.errorDesc;
    }
    return info;
  }
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | null> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p.catch(() => null),
      new Promise<null>((resolve) => {
        t = setTimeout(() => resolve(null), ms);
      }),
    ]);
  } finally {
    if (t) clearTimeout(t);
  }
}
