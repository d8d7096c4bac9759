/**
 * The machine's migratable device states, in the fixed section order
 *   timer, ferry-serial, ferry-vcpu (×smp, instance = index),
 *   ferry-disk-workload (only sent when a disk workload runs), globalstate.
 * `timer` and `globalstate` use QEMU's vmstate layouts byte for byte
 * (docs/spec/stream-format.md §7.2); the ferry-* devices are ours
 * (self-delimiting through the migration layer's be32 length, see types.ts).
 */
import type { MigratableDevice } from './types.js';
import { isRunState, type RunState } from './run-state.js';
import { VS_NSLOTS, VS_NSLOTS_V1 } from './layout.js';

/** What the devices need from the machine. */
export interface DeviceHost {
  readonly smp: number;
  vclockNs(): number;
  setVclockNs(ns: number): void;
  /** run state to record in globalstate */
  globalStateToSave(): string;
  setLoadedGlobalState(s: RunState): void;
  heartbeatState(): { count: number; periodNs: number };
  setHeartbeatState(count: number, periodNs: number): void;
  saveVcpu(index: number): Float64Array;
  /** validates and installs; throws Error with a clear message */
  loadVcpu(index: number, slots: Float64Array): void;
  /** Whether the machine runs a disk workload. */
  hasDiskWorkload(): boolean;
  /** The disk workload's state (only while paused; throws without one). */
  saveDiskWorkload(): Uint8Array;
  /** validates and adopts the source's disk workload; throws Error with a clear message */
  loadDiskWorkload(data: Uint8Array): void;
}

function checkLen(dev: string, data: Uint8Array, want: number): DataView {
  if (data.length !== want) {
    throw new Error(`${dev}: payload is ${data.length} bytes, expected ${want}`);
  }
  return new DataView(data.buffer, data.byteOffset, data.byteLength);
}

function checkVersion(dev: MigratableDevice, version: number): void {
  if (version < dev.minVersion || version > dev.version) {
    throw new Error(
      `${dev.idstr}: unsupported version ${version} (supported ${dev.minVersion}..${dev.version})`,
    );
  }
}

const MAX_NS = Number.MAX_SAFE_INTEGER;

/** QEMU `timer`, version 2: be64 cpu_ticks_offset, 8 unused, be64 cpu_clock_offset. */
export class TimerDevice implements MigratableDevice {
  readonly idstr = 'timer';
  readonly instanceId = 0;
  readonly version = 2;
  readonly minVersion = 2;
  constructor(private host: DeviceHost) {}
  payloadSize(): number {
    return 24;
  }
  save(): Uint8Array {
    // Saved while the VM is stopped, as QEMU does: both offsets then hold the
    // virtual clock value (ns). We count ticks in ns too.
    const out = new Uint8Array(24);
    const dv = new DataView(out.buffer);
    const ns = BigInt(Math.floor(this.host.vclockNs()));
    dv.setBigInt64(0, ns);
    dv.setBigInt64(16, ns);
    return out;
  }
  load(data: Uint8Array, version: number): void {
    checkVersion(this, version);
    const dv = checkLen('timer', data, 24);
    const clock = dv.getBigInt64(16);
    if (clock < 0n || clock > BigInt(MAX_NS)) {
      throw new Error(`timer: cpu_clock_offset ${clock} out of range (0..${MAX_NS} ns)`);
    }
    // cpu_ticks_offset and the unused field are accepted as they come.
    this.host.setVclockNs(Number(clock));
  }
}

/** QEMU `globalstate`, version 1: be32 size = strlen+1, 100-byte NUL-padded name. */
export class GlobalStateDevice implements MigratableDevice {
  readonly idstr = 'globalstate';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;
  constructor(private host: DeviceHost) {}
  payloadSize(): number {
    return 104;
  }
  save(): Uint8Array {
    return encodeGlobalState(this.host.globalStateToSave());
  }
  load(data: Uint8Array, version: number): void {
    checkVersion(this, version);
    this.host.setLoadedGlobalState(decodeGlobalState(data));
  }
}

export function encodeGlobalState(state: string): Uint8Array {
  const name = Buffer.from(state, 'latin1');
  if (name.length === 0 || name.length > 99) throw new Error(`globalstate: bad run state name '${state}'`);
  const out = new Uint8Array(104);
  new DataView(out.buffer).setUint32(0, name.length + 1);
  out.set(name, 4);
  return out;
}

/** The run state name of a globalstate payload; throws unless it is a QAPI RunState. */
export function decodeGlobalState(data: Uint8Array): RunState {
  const dv = checkLen('globalstate', data, 104);
  const size = dv.getUint32(0);
  if (size < 1 || size > 100) throw new Error(`globalstate: size ${size} out of range 1..100`);
  const name = data.subarray(4, 4 + size - 1);
  if (data[4 + size - 1] !== 0) throw new Error(`globalstate: run state name is not NUL-terminated at size ${size}`);
  if (name.includes(0)) throw new Error('globalstate: run state name shorter than its size field');
  const s = Buffer.from(name).toString('latin1');
  if (!isRunState(s)) throw new Error(`globalstate: invalid run state '${s}'`);
  return s;
}

/** ferry-serial, version 1: be64 heartbeats printed so far, be64 period ns. */
export class SerialDevice implements MigratableDevice {
  readonly idstr = 'ferry-serial';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;
  constructor(private host: DeviceHost) {}
  payloadSize(): undefined {
    return undefined;
  }
  save(): Uint8Array {
    const { count, periodNs } = this.host.heartbeatState();
    const out = new Uint8Array(16);
    const dv = new DataView(out.buffer);
    dv.setBigUint64(0, BigInt(count));
    dv.setBigUint64(8, BigInt(periodNs));
    return out;
  }
  load(data: Uint8Array, version: number): void {
    checkVersion(this, version);
    const dv = checkLen('ferry-serial', data, 16);
    const count = dv.getBigUint64(0);
    const period = dv.getBigUint64(8);
    if (count > BigInt(MAX_NS)) throw new Error(`ferry-serial: heartbeat count ${count} out of range`);
    if (period < 1_000_000n || period > BigInt(MAX_NS)) {
      throw new Error(`ferry-serial: heartbeat period ${period} ns out of range (>= 1 ms)`);
    }
    this.host.setHeartbeatState(Number(count), Number(period));
  }
}

const VCPU_MAGIC = 0x46564350; // "FVCP"

/**
 * ferry-vcpu, version 2, instance = vCPU index: "FVCP", be32 slot count,
 * then the vCPU's workload slots (layout.ts VS_*) as be64 doubles: workload
 * kind and parameters, seed, stripe, steps, PRNG state, sweep position/round,
 * stress read flag and read checksum. Version 1 is the same with the first
 * 20 slots only (no read flag / checksum); it loads as read=off, sum 0.
 * Loading adopts the source's workload (after validating it against this
 * machine's RAM size and vCPU count).
 */
export class VcpuDevice implements MigratableDevice {
  readonly idstr = 'ferry-vcpu';
  readonly version = 2;
  readonly minVersion = 1;
  constructor(
    private host: DeviceHost,
    readonly instanceId: number,
  ) {}
  payloadSize(): undefined {
    return undefined;
  }
  save(): Uint8Array {
    const slots = this.host.saveVcpu(this.instanceId);
    const out = new Uint8Array(8 + slots.length * 8);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, VCPU_MAGIC);
    dv.setUint32(4, slots.length);
    for (let i = 0; i < slots.length; i++) dv.setFloat64(8 + i * 8, slots[i]!);
    return out;
  }
  load(data: Uint8Array, version: number): void {
    checkVersion(this, version);
    if (data.length < 8) throw new Error(`ferry-vcpu ${this.instanceId}: payload too short (${data.length} bytes)`);
    const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
    if (dv.getUint32(0) !== VCPU_MAGIC) throw new Error(`ferry-vcpu ${this.instanceId}: bad magic`);
    const n = dv.getUint32(4);
    if (data.length !== 8 + n * 8) {
      throw new Error(`ferry-vcpu ${this.instanceId}: payload is ${data.length} bytes, expected ${8 + n * 8} for ${n} slots`);
    }
    if (version === 1 && n !== VS_NSLOTS_V1) {
      throw new Error(`ferry-vcpu ${this.instanceId}: version 1 has ${VS_NSLOTS_V1} slots, got ${n}`);
    }
    // version 1: the missing slots (read flag, checksum) are 0
    const slots = new Float64Array(version === 1 ? VS_NSLOTS : n);
    for (let i = 0; i < n; i++) slots[i] = dv.getFloat64(8 + i * 8);
    this.host.loadVcpu(this.instanceId, slots);
  }
}

/**
 * ferry-disk-workload, version 1, instance 0: the disk workload's
 * configuration and state (disk-workload.ts: "FDWL", be32 drive name
 * length, the name, 13 be64 doubles). Sent only when the source has a disk
 * workload, so streams without one are unchanged; every machine can load
 * it, and loading adopts the source's workload (its drive must exist here
 * and be writable).
 */
export class DiskWorkloadDevice implements MigratableDevice {
  readonly idstr = 'ferry-disk-workload';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;
  constructor(private host: DeviceHost) {}
  payloadSize(): undefined {
    return undefined;
  }
  needed(): boolean {
    return this.host.hasDiskWorkload();
  }
  save(): Uint8Array {
    return this.host.saveDiskWorkload();
  }
  load(data: Uint8Array, version: number): void {
    checkVersion(this, version);
    this.host.loadDiskWorkload(data);
  }
}
