/**
 * One COLO checkpoint as bytes (docs/spec/stream-format.md §14): a whole
 * migration stream in memory — header, configuration, `ram` START (the
 * block list) and END (every page dirtied since the checkpoint before),
 * every device's FULL section, EOF, vmdesc — sent after vmstate-size.
 *
 * Primary (CheckpointWriter): built while the guest is stopped, into a
 * buffer that is kept between checkpoints (so no checkpoint faults fresh
 * memory in during the pause). The pages go as plain PAGE and ZERO records:
 * XBZRLE and compression would lengthen the pause on the link this is for.
 *
 * Secondary (CheckpointLoader): the whole checkpoint is in memory before
 * anything is applied (wire.ts readBlob). validate() reads it all without
 * writing anything: the block list must be this machine's, every page
 * record a ZERO or PAGE inside its block, every device section one of
 * ours; the device payloads are kept. apply() then loads the devices (a
 * device that refuses its payload puts every device back as it was and
 * nothing else changes), loads the pages into the RAM snapshot that holds
 * the primary's memory at the last checkpoint (QEMU's colo_cache), and puts
 * into guest RAM every page the checkpoint carried and every page the
 * secondary's own guest wrote since the last checkpoint. A checkpoint cut
 * short in transit or refused leaves the snapshot and the devices at the
 * previous checkpoint.
 */
import { Writable } from 'node:stream';
import type { MigratableDevice, RunState } from '../../machine/types.js';
import { decodeGlobalState, RamSnapshot } from '../../machine/index.js';
import { newBitmap, popcount32, setBit } from '../../base/bitmap.js';
import { copyBytes } from '../../base/native.js';
import { loadStream, type LoadHandlers } from '../core/load-loop.js';
import type { MachinePort } from '../core/port.js';
import { classifyLoadError } from '../errors.js';
import type { RamSaveSection } from '../ram/section.js';
import { RamLoader } from '../ram/loader.js';
import { buildVmdesc, deviceLoader, findDevice, writeDeviceSections } from '../sections/device-sections.js';
import { FIRST_SECTION_ID } from '../sections/registry.js';
import { StreamReader } from '../stream/reader.js';
import { StreamWriter } from '../stream/writer.js';
import { WIRE } from '../wire/constants.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import { putConfiguration, putEof, putFooter, putHeader, putSectionPartEnd, putSectionStartFull, putVmdesc, readVmdesc } from '../wire/records.js';
import { COLO_ERR } from './wire.js';

const S = WIRE.SECTION;
const F = WIRE.RAM;
const RAM_ID = FIRST_SECTION_ID;
/** Staging buffer of the checkpoint writer. */
const STAGING = 4 << 20;

/**
 * A Writable that copies what it gets into a list of fixed-size chunks,
 * kept from checkpoint to checkpoint: a bigger checkpoint adds chunks (no
 * copy of what is there), later ones reuse them (no fresh memory to fault in).
 */
class Collector extends Writable {
  private readonly chunks: Buffer[] = [];
  /** Bytes collected since reset(). */
  length = 0;

  reset(): void {
    this.length = 0;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    let off = 0;
    while (off < chunk.length) {
      const k = Math.floor(this.length / STAGING);
      const at = this.length % STAGING;
      if (k === this.chunks.length) this.chunks.push(Buffer.allocUnsafeSlow(STAGING));
      const n = Math.min(STAGING - at, chunk.length - off);
      copyBytes(this.chunks[k]!, at, chunk, off, n);
      off += n;
      this.length += n;
    }
    cb();
  }

  /** The collected bytes, as views of the chunks (valid until the next reset()). */
  views(): Buffer[] {
    const out: Buffer[] = [];
    for (let left = this.length, k = 0; left > 0; k++) {
      const n = Math.min(STAGING, left);
      out.push(this.chunks[k]!.subarray(0, n));
      left -= n;
    }
    return out;
  }
}

export interface BuiltCheckpoint {
  /** The stream, in pieces (views of the writer's chunks: valid until the next build). */
  data: Buffer[];
  /** Its length in bytes. */
  size: number;
  /** RAM pages it carries. */
  pages: number;
}

export class CheckpointWriter {
  private readonly collector = new Collector();
  private readonly w = new StreamWriter(this.collector, { reuseBuffers: true, bufferSize: STAGING });

  /** Guest stopped: the stream of one checkpoint. */
  async build(machineType: string, ram: RamSaveSection, devices: readonly MigratableDevice[]): Promise<BuiltCheckpoint> {
    const w = this.w;
    const sender = ram.sender;
    this.collector.reset();
    putHeader(w);
    putConfiguration(w, machineType);
    putSectionStartFull(w, S.START, RAM_ID, ram.idstr, ram.instanceId, ram.version);
    sender.sendSetup(w);
    putFooter(w, RAM_ID);
    putSectionPartEnd(w, S.END, RAM_ID);
    sender.syncDirtyLog();
    const pages = sender.dirtyPages;
    ram.ctx.onPass(sender.dirtySyncCount);
    for (;;) {
      const r = sender.sendPages(w, { maxMillis: Infinity });
      if (r.done) break;
      if (w.wantsFlush()) await w.flush();
    }
    sender.sendEos(w);
    putFooter(w, RAM_ID);
    const { entries } = writeDeviceSections(w, devices, RAM_ID + 1);
    putEof(w);
    putVmdesc(w, buildVmdesc(entries));
    await w.drain();
    return { data: this.collector.views(), size: this.collector.length, pages };
  }
}

/** A device payload of a checkpoint, read but not applied. */
interface DevicePayload {
  device: MigratableDevice;
  version: number;
  data: Uint8Array;
}

export interface ValidCheckpoint {
  data: Uint8Array;
  devices: DevicePayload[];
  /** Pages it carries, one bitmap per block (in this machine's block order). */
  received: Uint32Array[];
  receivedPages: number;
  /** The primary's run state at the checkpoint (its globalstate), if it sent one. */
  runState: RunState | undefined;
}

export interface AppliedCheckpoint {
  receivedPages: number;
  /** Pages the secondary's guest had written that were put back. */
  resetPages: number;
}

/** Stands in for a device while a checkpoint is read: keeps the payload, applies nothing. */
function recorder(d: MigratableDevice, into: DevicePayload[]): MigratableDevice {
  return {
    idstr: d.idstr,
    instanceId: d.instanceId,
    version: d.version,
    minVersion: d.minVersion,
    payloadSize: d.payloadSize?.bind(d),
    save: () => d.save(),
    load: (data, version) => void into.push({ device: d, version, data }),
  };
}

export class CheckpointLoader {
  private readonly blockIndex = new Map<string, number>();

  /**
   * `cache`: the primary's RAM at the last checkpoint. `devices`: every
   * device a checkpoint may carry (the machine's, then COLO's own).
   */
  constructor(
    private readonly machine: MachinePort,
    readonly cache: RamSnapshot,
    private readonly devices: readonly MigratableDevice[],
  ) {
    machine.ram.forEach((b, i) => this.blockIndex.set(b.name, i));
  }

  /** Reads the whole checkpoint, writes nothing; throws QEMU-style errors for anything wrong. */
  async validate(data: Uint8Array): Promise<ValidCheckpoint> {
    const ram = this.machine.ram;
    const received = ram.map((b) => newBitmap(b.pages));
    const payloads: DevicePayload[] = [];
    // announced block index (stream order) -> ours
    const ours: number[] = [];
    let listed = false;
    const inspect = new RamLoader([], {
      inspect: true,
      observer: {
        blockList: (_total, blocks) => {
          if (blocks.length !== ram.length) throw new MigrationStreamError(`COLO checkpoint lists ${blocks.length} RAM blocks, this machine has ${ram.length}`);
          for (const { name, length } of blocks) {
            const i = this.blockIndex.get(name);
            if (i === undefined) throw new MigrationStreamError(ERR.unknownRamBlock(name));
            if (ram[i]!.size !== length) throw new MigrationStreamError(ERR.sizeMismatch(name, length, ram[i]!.size));
            ours.push(i);
          }
          listed = true;
        },
        page: (kind, _flags, b, offset) => {
          if (kind !== F.PAGE && kind !== F.ZERO) throw new MigrationStreamError(`COLO checkpoint: page record 0x${kind.toString(16)} at ${offset.toString(16)} (only PAGE and ZERO are accepted)`);
          setBit(received[ours[b]!]!, offset / 4096);
        },
      },
    });
    const recorders = this.devices.map((d) => recorder(d, payloads));
    const handlers: LoadHandlers = {
      section: (kind, idstr, instanceId) => {
        if (kind === 'start') {
          if (idstr !== F.IDSTR || instanceId !== 0) return undefined;
          return { loader: { load: (r, _k, v) => inspect.loadSection(r, v) }, version: F.VERSION, minVersion: F.VERSION };
        }
        const d = findDevice(recorders, idstr, instanceId);
        return d && { loader: deviceLoader(d), version: d.version, minVersion: d.minVersion };
      },
      command: (c) => {
        throw new MigrationStreamError(`COLO checkpoint: unexpected command ${c.cmd}`);
      },
    };
    const r = StreamReader.fromBuffer(data);
    try {
      await loadStream(r, handlers, { machineType: this.machine.machineType });
      if (r.available > 0) await readVmdesc(r);
    } catch (e) {
      throw classifyLoadError(e, (msg, cause) => new MigrationStreamError(msg, { cause }));
    }
    if (!listed && inspect.counters.pages > 0) throw new MigrationStreamError(ERR.badStream());
    let receivedPages = 0;
    for (const bm of received) for (let i = 0; i < bm.length; i++) receivedPages += popcount32(bm[i]!);
    const gs = payloads.find((p) => p.device.idstr === WIRE.DEVICE.GLOBALSTATE.IDSTR);
    let runState: RunState | undefined;
    try {
      runState = gs ? decodeGlobalState(gs.data) : undefined;
    } catch (e) {
      throw new MigrationStreamError((e as Error).message, { cause: e });
    }
    return { data, devices: payloads, received, receivedPages, runState };
  }

  /**
   * Applies a validated checkpoint (guest stopped). The device loads come
   * first and are undone when one fails; after them nothing can fail.
   */
  async apply(cp: ValidCheckpoint): Promise<AppliedCheckpoint> {
    loadDevices(cp.devices);
    // the pages into the snapshot: the same loader as a migration, over the copy
    const loader = new RamLoader(this.cache.blocks);
    const skip = this.devices.map((d) => recorder(d, []));
    const handlers: LoadHandlers = {
      section: (kind, idstr, instanceId) => {
        if (kind === 'start') return { loader: { load: (r, _k, v) => loader.loadSection(r, v) }, version: F.VERSION, minVersion: F.VERSION };
        const d = findDevice(skip, idstr, instanceId)!;
        return { loader: deviceLoader(d), version: d.version, minVersion: d.minVersion };
      },
      command: () => undefined,
    };
    await loadStream(StreamReader.fromBuffer(cp.data), handlers, { machineType: this.machine.machineType });
    // what the checkpoint carried, and what our own guest wrote since the last one, from the copy
    const pages = cp.received;
    const resetPages = this.machine.takeDirtyPages(pages);
    this.machine.restoreRamPages(this.cache, pages);
    return { receivedPages: cp.receivedPages, resetPages };
  }
}

/** Loads every payload; if one is refused, every device gets its state from before back, and the error is thrown. */
export function loadDevices(payloads: readonly DevicePayload[]): void {
  const before = payloads.map((p) => ({ device: p.device, data: p.device.save() }));
  try {
    for (const p of payloads) p.device.load(p.data, p.version);
  } catch (e) {
    for (const b of before) {
      try {
        b.device.load(b.data, b.device.version);
      } catch {
        /* it was loadable a moment ago */
      }
    }
    const err = classifyLoadError(e, (msg, cause) => new MigrationStreamError(COLO_ERR.loadvm(msg), { cause }));
    throw err;
  }
}

/** The machine's device state now, as payloads to load later (the rollback of a failover). */
export function saveDevices(devices: readonly MigratableDevice[]): DevicePayload[] {
  return devices.filter((d) => d.needed?.() !== false).map((d) => ({ device: d, version: d.version, data: d.save() }));
}

export type { DevicePayload };
