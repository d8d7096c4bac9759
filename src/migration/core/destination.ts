/**
 * The incoming migration (qmp.md B.7, C.2; stream-format.md §5): listen or
 * read from the URI, validate the stream, load RAM and devices, and only when
 * everything has loaded enter the run state the stream asks for.
 *
 *   none --listen--> setup (event always) --stream--> active -> completed | failed
 *   active -> postcopy-active (POSTCOPY_LISTEN) -> completed | failed
 *
 * A failed load leaves the guest stopped in `inmigrate`; it never runs a
 * half-loaded guest. Unlike QEMU, the process does not exit on failure: it
 * stays up so that management can read `error-desc` over QMP.
 *
 * Postcopy (stream-format.md §9.5, §10, §11): RAM_DISCARD marks pages
 * missing, the PACKAGED blob carries LISTEN, the devices and RUN, and the
 * guest starts before the rest of RAM has come. A vCPU that touches a
 * missing page blocks; the page is requested on the return path and the
 * vCPU goes on once the page is in place. If the postcopy phase fails after
 * the guest started, the guest is stopped for good (run state
 * internal-error): it never runs on with holes in its memory.
 */
import { EventEmitter } from 'node:events';
import type { MigrationInfo, MigrationStatus } from '../../generated/qapi-types.js';
import { listenIncoming, parseMigrationUri, type Channel, type IncomingListener } from '../channel/index.js';
import { DecompressPool } from '../codec/compress-pool.js';
import { devicesByKey, readDeviceSection } from '../devices.js';
import { RamLoader } from '../ram/loader.js';
import { StreamReader } from '../stream/reader.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import {
  encodeRpPong,
  encodeRpReqPages,
  encodeRpReqPagesId,
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

/** Read-ahead of the main stream in postcopy (see StreamReader.setHighWater). */
const POSTCOPY_READ_AHEAD = 16 * 1024;

/** QEMU's PostcopyState numbers (they appear in its error texts). */
const enum Pc {
  None = 0,
  Advise = 1,
  Discard = 2,
  Listening = 3,
  Running = 4,
  End = 5,
}

/** Everything the section loop needs, for the main stream and a PACKAGED blob. */
interface LoadContext {
  ch: Channel;
  ram: RamLoader;
  devices: ReturnType<typeof devicesByKey>;
  /** section id → idstr and version, from START */
  live: Map<number, { idstr: string; version: number }>;
}

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
  private pc: Pc = Pc.None;
  /** Pages requested on the return path, per block (one request per page). */
  private requested: Uint32Array[] = [];
  /** Block of the last REQ_PAGES_ID sent (REQ_PAGES refers to it). */
  private reqBlock = -1;
  /** Page requests sent to the source. */
  pageRequests = 0;

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
    try {
      await this.load(ch);
    } catch (e) {
      if (this.rpOpen) this.sendRp(encodeRpShut(1));
      if (this.pc >= Pc.Listening) {
        // the guest may have run on pages from here: it must not go on with holes
        await this.machine.abandonIncoming().catch(() => undefined);
      }
      this.failWith(e);
      if (this.rpOpen) closeAfterShut(ch);
      else ch.close();
      return;
    }
    this.totalTime = Math.round(this.now() - this.startTime);
    if (this.pc === Pc.None) {
      try {
        await this.startGuest();
      } catch (e) {
        this.failWith(e);
        ch.close();
        return;
      }
    }
    if (this.rpOpen) this.sendRp(encodeRpShut(0));
    this.setStatus('completed');
    if (this.rpOpen) closeAfterShut(ch);
    else setTimeout(() => ch.close(), 0).unref();
  }

  private rpOpen = false;
  private readonly clock = new MigrationClockDevice();

  /** Enter the run state the stream asked for; note the real downtime. */
  private async startGuest(): Promise<void> {
    await this.machine.finishIncoming();
    this.resumedAtUs = wallClockUs();
    if (this.clock.stopWallUs > 0) {
      this.downtime = Math.max(0, Math.round((this.resumedAtUs - this.clock.stopWallUs) / 1000));
    }
  }

  /** A vCPU touched a missing page: ask the source for it (once). */
  private onFault(block: number, page: number): void {
    const req = this.requested[block];
    if (!req || !this.rpOpen || this.pc !== Pc.Running) return;
    const bit = 1 << (page & 31);
    // already asked for, or arrived since the vCPU posted the fault
    if ((req[page >>> 5]! & bit) !== 0 || (this.machine.ram[block]!.present[page >>> 5]! & bit) !== 0) return;
    req[page >>> 5] = (req[page >>> 5]! | bit) >>> 0;
    const start = page * TARGET_PAGE_SIZE;
    if (block === this.reqBlock) {
      this.sendRp(encodeRpReqPages(start, TARGET_PAGE_SIZE));
    } else {
      this.reqBlock = block;
      this.sendRp(encodeRpReqPagesId(start, TARGET_PAGE_SIZE, this.machine.ram[block]!.name));
    }
    this.pageRequests++;
  }

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

  /** Runs the section loop to EOF. */
  private async load(ch: Channel): Promise<void> {
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

  private async loadStream(ch: Channel, pool: DecompressPool | null): Promise<void> {
    const r = new StreamReader(ch.input);
    this.reader = r;
    await readHeader(r);
    await readConfiguration(r, this.machine.machineType);
    const ram = new RamLoader(this.machine.ram, {
      compress: pool !== null,
      decompressPool: pool ?? undefined,
      placed: (b, page) => this.machine.markPresent(b, page),
    });
    const ctx: LoadContext = { ch, ram, devices: devicesByKey([...this.machine.devices, this.clock]), live: new Map() };
    await this.sectionLoop(r, ctx, false);
  }

  /**
   * The section loop over the main stream, or over a PACKAGED blob
   * (`packaged`), which ends at its POSTCOPY_RUN or EOF.
   */
  private async sectionLoop(r: StreamReader, ctx: LoadContext, packaged: boolean): Promise<void> {
    const { ram, live } = ctx;
    for (;;) {
      if (!r.has(1)) await r.ensure(1);
      const t = r.get8();
      switch (t) {
        case S.EOF: {
          if (packaged) return;
          if (this.pc >= Pc.Listening) {
            // postcopy: no vmdesc; every page must be here now
            this.endPostcopy();
          } else {
            const vm = await withTimeout(readVmdesc(r), 2000);
            if (vm && vm.notice) this.deps.log?.(vm.notice);
          }
          this.bytesReceived = r.bytesRead;
          return;
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
          await readDeviceSection(r, ctx.devices);
          break;
        case S.COMMAND:
          if ((await this.command(r, ctx)) === 'run' && packaged) return;
          break;
        default:
          throw new MigrationStreamError(ERR.unknownSectionType(t));
      }
      if (!packaged) this.bytesReceived = r.bytesRead;
    }
  }

  /** One command record (stream-format.md §10). */
  private async command(r: StreamReader, ctx: LoadContext): Promise<'run' | void> {
    const c = await readCommand(r);
    switch (c.cmd) {
      case 'OPEN_RETURN_PATH':
        if (!ctx.ch.bidirectional) throw new MigrationStreamError('Unable to open the return path');
        this.rpOpen = true;
        return;
      case 'PING':
        if (!this.rpOpen) throw new MigrationStreamError('Received PING but no return path');
        this.sendRp(encodeRpPong(c.value));
        return;
      case 'POSTCOPY_ADVISE':
        if (!this.options.capability('postcopy-ram')) {
          // as QEMU 7.2: a precopy can still complete; a switch will fail below
          this.deps.log?.('Postcopy advice ignored: the postcopy-ram capability is off on the destination');
          return;
        }
        if (this.pc !== Pc.None) throw new MigrationStreamError(ERR.postcopyWrongState('CMD_POSTCOPY_ADVISE', this.pc));
        if (c.pageSizeSummary !== TARGET_PAGE_SIZE) {
          throw new MigrationStreamError(ERR.postcopyPageSizes(c.pageSizeSummary, TARGET_PAGE_SIZE));
        }
        if (c.targetPageSize !== TARGET_PAGE_SIZE) {
          throw new MigrationStreamError(ERR.postcopyTargetPageSizes(c.targetPageSize, TARGET_PAGE_SIZE));
        }
        this.pc = Pc.Advise;
        return;
      case 'POSTCOPY_RAM_DISCARD':
        if (this.pc !== Pc.Advise && this.pc !== Pc.Discard) {
          throw new MigrationStreamError(ERR.postcopyWrongState('CMD_POSTCOPY_RAM_DISCARD', this.pc));
        }
        this.pc = Pc.Discard;
        this.discard(c.blockName, c.ranges);
        return;
      case 'PACKAGED':
        // the whole blob is in memory (readCommand read it): load it as a stream body
        await this.sectionLoop(StreamReader.fromBuffer(c.blob!), ctx, true);
        return;
      case 'POSTCOPY_LISTEN':
        if (this.pc !== Pc.Advise && this.pc !== Pc.Discard) {
          throw new MigrationStreamError(ERR.postcopyWrongState('CMD_POSTCOPY_LISTEN', this.pc));
        }
        if (!this.rpOpen) throw new MigrationStreamError('Postcopy needs a return path');
        this.pc = Pc.Listening;
        ctx.ram.postcopy = true;
        this.reader?.setHighWater(POSTCOPY_READ_AHEAD);
        this.requested = this.machine.ram.map((b) => new Uint32Array((b.pages + 31) >>> 5));
        this.machine.beginDemandPaging((b, page) => this.onFault(b, page));
        this.setStatus('postcopy-active');
        return;
      case 'POSTCOPY_RUN':
        if (this.pc !== Pc.Listening) throw new MigrationStreamError(ERR.postcopyWrongState('CMD_POSTCOPY_RUN', this.pc));
        this.pc = Pc.Running;
        await this.startGuest();
        return 'run';
    }
  }

  /** RAM_DISCARD: these pages are missing until they come again. */
  private discard(name: string, ranges: ReadonlyArray<readonly [number, number]>): void {
    const b = this.machine.ram.findIndex((x) => x.name === name);
    if (b < 0) throw new MigrationStreamError(ERR.discardNoBlock(name));
    const block = this.machine.ram[b]!;
    const present = block.present;
    for (const [start, len] of ranges) {
      if (start + len > block.size || start % TARGET_PAGE_SIZE !== 0 || len % TARGET_PAGE_SIZE !== 0) {
        throw new MigrationStreamError(ERR.discardOverrun(name, start, len));
      }
      for (let p = start / TARGET_PAGE_SIZE, e = (start + len) / TARGET_PAGE_SIZE; p < e; p++) {
        if ((p & 31) === 0 && p + 32 <= e) {
          present[p >>> 5] = 0;
          p += 31;
        } else {
          present[p >>> 5] = present[p >>> 5]! & ~(1 << (p & 31));
        }
      }
    }
  }

  /** End of the postcopy stream: all of RAM is here, vCPUs stop checking. */
  private endPostcopy(): void {
    let missing = 0;
    for (const b of this.machine.ram) {
      for (let p = 0; p < b.pages; p++) {
        if ((p & 31) === 0 && p + 32 <= b.pages && b.present[p >>> 5] === -1) {
          p += 31;
          continue;
        }
        if (((b.present[p >>> 5]! >>> (p & 31)) & 1) === 0) missing++;
      }
    }
    if (missing > 0) throw new MigrationStreamError(ERR.postcopyPagesMissing(missing));
    this.machine.endDemandPaging();
    this.pc = Pc.End;

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

/** How long a destination keeps reading after its SHUT, at most. */
const SHUT_LINGER_MS = 1000;

/**
 * After our SHUT: end our direction and swallow what the source still sends
 * until it closes (or for SHUT_LINGER_MS). Closing at once could make the
 * source's next write fail (EPIPE) and its socket be destroyed with the SHUT
 * unread, and the source needs the SHUT: SHUT 0 is what completes it, and a
 * failing SHUT before PONG 3 tells it that our guest never ran, so that it
 * may run its own again.
 */
function closeAfterShut(ch: Channel): void {
  ch.input.removeAllListeners('data');
  ch.input.on('data', () => undefined);
  ch.input.resume();
  ch.output.end();
  setTimeout(() => ch.close(), SHUT_LINGER_MS).unref();
  ch.input.once('end', () => ch.close());
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
