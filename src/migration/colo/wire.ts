/**
 * COLO's framing (docs/spec/stream-format.md §14): after the first
 * migration, the main stream and the return path carry COLOMessages,
 *
 *   be32 message                  (COLOMessage, 0..6)
 *   [be64 value]                  vmstate-size only: the checkpoint's length
 *   [value bytes]                 after vmstate-size: the checkpoint stream
 *
 * and QEMU's texts for what goes wrong. Two messages are Ferry's own, sent
 * only between Ferry peers that exchanged the ferry-colo section
 * (devices.ts): a heartbeat (no payload) and a console line (be32 length,
 * the bytes), secondary to primary. Their numbers are far outside
 * COLOMessage, so a peer that does not know them refuses them
 * ("colo_receive_message: Invalid message") instead of misreading them.
 */
import type { COLOMessage } from '../../generated/qapi-types.js';
import { ChannelError } from '../channel/errors.js';
import { MigrationFailure, errorMessage } from '../errors.js';
import { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';

/** COLOMessage values (enum order of the schema). */
export const MSG = {
  CHECKPOINT_READY: 0,
  CHECKPOINT_REQUEST: 1,
  CHECKPOINT_REPLY: 2,
  VMSTATE_SEND: 3,
  VMSTATE_SIZE: 4,
  VMSTATE_RECEIVED: 5,
  VMSTATE_LOADED: 6,
} as const;

/** COLO_MESSAGE__MAX: the first value that is not a COLOMessage. */
export const MSG_MAX = 7;

/** Ferry's heartbeat (either direction): a sign of life, nothing else. */
export const FERRY_HEARTBEAT = 0x46430001;
/** Ferry's console line (secondary to primary): be32 length, then the line. */
export const FERRY_CONSOLE = 0x46430002;
/** Longest console line carried. */
export const CONSOLE_LINE_MAX = 64 * 1024;

const NAMES: readonly COLOMessage[] = [
  'checkpoint-ready',
  'checkpoint-request',
  'checkpoint-reply',
  'vmstate-send',
  'vmstate-size',
  'vmstate-received',
  'vmstate-loaded',
];

export function messageName(m: number): string {
  return NAMES[m] ?? `0x${m.toString(16)}`;
}

/** QEMU's texts (migration/colo.c). */
export const COLO_ERR = {
  cantReceive: (why: string) => `Can't receive COLO message: ${why}`,
  cantSend: (why: string) => `Can't send COLO message: ${why}`,
  invalid: () => 'colo_receive_message: Invalid message',
  unexpected: (got: number, expected: number) => `Unexpected COLO message ${got}, expected ${expected}`,
  unknown: (got: number) => `Got unknown COLO message: ${got}`,
  noValue: (m: number, why: string) => `Failed to get value for COLO message: ${messageName(m)}: ${why}`,
  short: (got: number, expected: number) => `Got ${got} VMState data, less than expected ${expected}`,
  loadvm: (why: string) => `COLO: loadvm failed: ${why}`,
  noReturnPath: () => 'Open QEMUFile from_dst_file failed',
} as const;

/** Why a read failed, as QEMU's strerror part: a peer that went away reads as EIO. */
function readFailure(e: unknown): string {
  if (e instanceof ChannelError && e.code !== undefined && e.code !== 'EIO') return errorMessage(e);
  return 'Input/output error';
}

/** A read that could not get its bytes (the stream ended or failed): the peer or the link is gone. */
function receiveError(e: unknown, text: (why: string) => string): MigrationFailure {
  return new ChannelError(text(readFailure(e)), 'EIO', { cause: e });
}

/** One message read off a COLO stream. */
export interface ColoMessage {
  msg: number;
  /** FERRY_CONSOLE: the line */
  line?: string;
}

/**
 * Reads COLOMessages from one direction of the channel. `extensions`:
 * Ferry's own messages are understood (otherwise they are invalid, as for
 * QEMU). Every read resolves with a whole message or rejects with QEMU's
 * text; `onAlive` runs for every message read, Ferry's included.
 */
export class ColoReader {
  extensions = false;

  constructor(
    readonly reader: StreamReader,
    private readonly onAlive: () => void = () => undefined,
  ) {}

  /** Waits for n bytes; a stream that ends or fails first is a lost peer. */
  private async need(n: number): Promise<void> {
    try {
      if (!this.reader.has(n)) await this.reader.ensure(n);
    } catch (e) {
      throw receiveError(e, COLO_ERR.cantReceive);
    }
  }

  /** The next message, Ferry's heartbeats included. */
  async next(): Promise<ColoMessage> {
    const r = this.reader;
    await this.need(4);
    const msg = r.get32();
    if (msg < MSG_MAX) {
      this.onAlive();
      return { msg };
    }
    if (!this.extensions || (msg !== FERRY_HEARTBEAT && msg !== FERRY_CONSOLE)) throw new MigrationStreamError(COLO_ERR.invalid());
    this.onAlive();
    if (msg === FERRY_HEARTBEAT) return { msg };
    await this.need(4);
    const len = StreamReader.checkLength(r.get32(), CONSOLE_LINE_MAX, 'a COLO console line');
    await this.need(len);
    return { msg, line: r.getBytes(len).toString('utf8') };
  }

  /** The next COLOMessage, skipping heartbeats (a console line goes to `onLine`). */
  async nextColo(onLine?: (line: string) => void): Promise<number> {
    for (;;) {
      const m = await this.next();
      if (m.msg === FERRY_HEARTBEAT) continue;
      if (m.msg === FERRY_CONSOLE) {
        onLine?.(m.line!);
        continue;
      }
      return m.msg;
    }
  }

  /** The next COLOMessage must be `expected` ("Unexpected COLO message %d, expected %d"). */
  async expect(expected: number): Promise<void> {
    const got = await this.nextColo();
    if (got !== expected) throw new MigrationStreamError(COLO_ERR.unexpected(got, expected));
  }

  /** `expected` (vmstate-size) and its be64 value. */
  async expectValue(expected: number): Promise<number> {
    await this.expect(expected);
    const r = this.reader;
    try {
      if (!r.has(8)) await r.ensure(8);
      return r.get64();
    } catch (e) {
      throw receiveError(e, (why) => COLO_ERR.noValue(expected, why));
    }
  }

  /**
   * Exactly n bytes into dst (grown as needed, kept between checkpoints);
   * a short read is QEMU's "Got %d VMState data, less than expected %d".
   * `progress` sees the bytes as they come (a sign of life).
   */
  async readBlob(dst: Buffer, n: number): Promise<Buffer> {
    const out = dst.length >= n ? dst : Buffer.allocUnsafeSlow(n);
    const r = this.reader;
    let got = 0;
    try {
      while (got < n) {
        if (r.available === 0) await r.ensure(1);
        const k = Math.min(r.available, n - got);
        r.copyTo(out, got, k);
        got += k;
        this.onAlive();
      }
    } catch (e) {
      throw new ChannelError(COLO_ERR.short(got, n), 'EIO', { cause: e });
    }
    return out;
  }
}

/** Whether a writable can still take writes. */
function writable(out: NodeJS.WritableStream & { destroyed?: boolean; writableEnded?: boolean }): boolean {
  return !out.destroyed && !out.writableEnded;
}

/**
 * Writes COLOMessages to one direction of the channel. A write that fails
 * (the peer went away) is remembered; the reader of the other direction
 * sees the same failure, which is how the loops learn of it.
 */
export class ColoWriter {
  extensions = false;
  error: MigrationFailure | null = null;
  /** Bytes written so far. */
  bytesWritten = 0;
  private lastWrite = 0;

  constructor(
    private readonly out: NodeJS.WritableStream & { destroyed?: boolean; writableEnded?: boolean },
    private readonly now: () => number,
  ) {}

  private write(b: Buffer): void {
    if (this.error) throw this.error;
    if (!writable(this.out)) {
      this.error = new ChannelError(COLO_ERR.cantSend('Input/output error'), 'EIO');
      throw this.error;
    }
    this.lastWrite = this.now();
    this.bytesWritten += b.length;
    this.out.write(b, (e?: Error | null) => {
      if (e && !this.error) this.error = new ChannelError(COLO_ERR.cantSend(readFailure(e)), 'EIO', { cause: e });
    });
  }

  send(msg: number): void {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(msg);
    this.write(b);
  }

  /** vmstate-send, vmstate-size and its value, then the checkpoint's bytes, in one go (nothing can come between). */
  sendCheckpoint(data: readonly Buffer[], size: number): void {
    const b = Buffer.allocUnsafe(16);
    b.writeUInt32BE(MSG.VMSTATE_SEND, 0);
    b.writeUInt32BE(MSG.VMSTATE_SIZE, 4);
    b.writeBigUInt64BE(BigInt(size), 8);
    this.write(b);
    for (const d of data) if (d.length > 0) this.write(d);
  }

  /** Ferry's heartbeat, unless something else was written in the last `quietMs`. */
  heartbeat(quietMs: number): void {
    if (!this.extensions || this.error || this.now() - this.lastWrite < quietMs) return;
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(FERRY_HEARTBEAT);
    this.write(b);
  }

  /** A console line (secondary to primary); dropped without extensions. */
  consoleLine(line: string): void {
    if (!this.extensions || this.error) return;
    const text = Buffer.from(line, 'utf8');
    const n = Math.min(text.length, CONSOLE_LINE_MAX);
    const b = Buffer.allocUnsafe(8 + n);
    b.writeUInt32BE(FERRY_CONSOLE, 0);
    b.writeUInt32BE(n, 4);
    text.copy(b, 8, 0, n);
    this.write(b);
  }

  /** Bytes the transport still holds (a slow or dead link keeps them). */
  get buffered(): number {
    return (this.out as unknown as { writableLength?: number }).writableLength ?? 0;
  }
}
