/**
 * The two device sections COLO adds to a migration stream (and to every
 * checkpoint's stream):
 *
 *  - `COLOState` (QEMU 2.10, instance 0, version 1): one bool,
 *    colo_requested. The source sends it when x-colo is on; a destination
 *    that loads it with the flag set becomes a COLO secondary instead of
 *    finishing the migration (docs/spec/stream-format.md §14).
 *  - `ferry-colo` (Ferry's, version 1, be32-framed like the other ferry-*
 *    devices): the pair's id, whether the primary claims a witness before it
 *    fails over, and its heartbeat timeout. Its presence tells the secondary
 *    that the primary is a Ferry, so that both may use Ferry's own COLO
 *    messages (heartbeats, console lines: wire.ts). A primary started with
 *    x-qemu-compat=on does not send it: the wire is then 2.10's.
 */
import type { MigratableDevice } from '../../machine/types.js';

/** COLOState: `requested` is what the stream said (the source sets it to true). */
export class ColoStateDevice implements MigratableDevice {
  readonly idstr = 'COLOState';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;

  constructor(public requested = false) {}

  payloadSize(): number {
    return 1;
  }

  save(): Uint8Array {
    return Uint8Array.of(this.requested ? 1 : 0);
  }

  load(data: Uint8Array, version: number): void {
    if (version !== 1 || data.length !== 1) throw new Error(`COLOState: bad payload (${data.length} bytes, version ${version})`);
    // VMSTATE_BOOL: any non-zero byte is true
    this.requested = data[0] !== 0;
  }
}

const MAGIC = 0x46434f4c; // "FCOL"
const SIZE = 28;
const F_WITNESS = 1;

/** What the primary tells a Ferry secondary (see the file header). */
export interface FerryColoInfo {
  /** 16 random bytes naming the pair (the witness claim's file name). */
  pairId: Buffer;
  /** The primary claims the witness before it fails over. */
  witness: boolean;
  /** The primary's heartbeat timeout in ms (0: it never fails over by itself). */
  heartbeatTimeoutMs: number;
}

/** ferry-colo: on the source it saves what `info()` says now; on the destination `received` is what came. */
export class FerryColoDevice implements MigratableDevice {
  readonly idstr = 'ferry-colo';
  readonly instanceId = 0;
  readonly version = 1;
  readonly minVersion = 1;
  received: FerryColoInfo | null = null;

  constructor(private readonly info: () => FerryColoInfo = () => ({ pairId: Buffer.alloc(16), witness: false, heartbeatTimeoutMs: 0 })) {}

  payloadSize(): undefined {
    return undefined;
  }

  save(): Uint8Array {
    const i = this.info();
    const out = Buffer.alloc(SIZE);
    out.writeUInt32BE(MAGIC, 0);
    i.pairId.copy(out, 4, 0, 16);
    out.writeUInt32BE(i.witness ? F_WITNESS : 0, 20);
    out.writeUInt32BE(i.heartbeatTimeoutMs, 24);
    return out;
  }

  load(data: Uint8Array, version: number): void {
    if (version !== 1) throw new Error(`ferry-colo: unsupported version ${version}`);
    if (data.length !== SIZE) throw new Error(`ferry-colo: payload is ${data.length} bytes, expected ${SIZE}`);
    const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    if (b.readUInt32BE(0) !== MAGIC) throw new Error('ferry-colo: bad magic');
    const flags = b.readUInt32BE(20);
    if ((flags & ~F_WITNESS) !== 0) throw new Error(`ferry-colo: unknown flags 0x${flags.toString(16)}`);
    this.received = { pairId: Buffer.from(b.subarray(4, 20)), witness: (flags & F_WITNESS) !== 0, heartbeatTimeoutMs: b.readUInt32BE(24) };
  }
}

/** The receiving side's pair of them, for an incoming stream (any stream may carry them). */
export class ColoRequest {
  readonly state = new ColoStateDevice();
  readonly ferry = new FerryColoDevice();

  get devices(): MigratableDevice[] {
    return [this.state, this.ferry];
  }

  /** The stream asked for COLO. */
  get requested(): boolean {
    return this.state.requested;
  }
}
