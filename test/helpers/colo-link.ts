/**
 * A COLO link under test control: it sits between primary and secondary
 * (in process as a ChannelWrapper on the secondary, or between two
 * processes as a unix-socket proxy) and follows the COLO messages: the
 * secondary's replies on the way back, and after the n-th
 * checkpoint-reply the primary's vmstate-send / vmstate-size / checkpoint
 * bytes on the way there. Faults:
 *
 *   truncate  deliver only the first `at` bytes of the n-th checkpoint's
 *             data, then cut the link (both sides see it close)
 *   flip      XOR one byte of the n-th checkpoint's data
 *   rewrite   the n-th checkpoint-reply reaches the primary as another message
 *   freeze    forward nothing more in either direction, close nothing (a
 *             link that died silently)
 *   cut       close both sides now
 *   inject    bytes of the test's own to the secondary (in process only)
 *
 * The secondary's direction carries COLO messages from its first byte when
 * the return-path capability is off (these tests leave it off).
 */
import * as net from 'node:net';
import { Transform, type TransformCallback } from 'node:stream';
import { WrappedChannel, type ChannelWrapper } from '../../src/migration/channel/index.js';

const REPLY = 2;
const SEND = 3;
const SIZE = 4;
const HEARTBEAT = 0x46430001;
const CONSOLE = 0x46430002;

export interface LinkFault {
  /** which checkpoint (1 = the first after COLO started) */
  checkpoint: number;
  truncateAt?: number;
  flipAt?: number;
  /** the reply becomes this message */
  rewriteReply?: number;
}

/** Follows the secondary's messages (be32, console lines with their length). */
class BackParser {
  private buf = Buffer.alloc(0);
  replies = 0;
  /** Returns the chunk to forward (a reply may be rewritten in place). */
  feed(chunk: Buffer, onReply: (n: number, rewrite: (m: number) => void) => void): Buffer {
    const out = Buffer.from(chunk);
    const base = this.buf.length;
    this.buf = Buffer.concat([this.buf, chunk]);
    let p = 0;
    for (;;) {
      if (this.buf.length - p < 4) break;
      const m = this.buf.readUInt32BE(p);
      let len = 4;
      if (m === CONSOLE) {
        if (this.buf.length - p < 8) break;
        len = 8 + this.buf.readUInt32BE(p + 4);
        if (this.buf.length - p < len) break;
      }
      if (m === REPLY) {
        this.replies++;
        const at = p - base;
        onReply(this.replies, (v) => {
          // the message's bytes are in this chunk (rewrites are for whole, unsplit messages)
          if (at >= 0 && at + 4 <= out.length) out.writeUInt32BE(v, at);
        });
      }
      p += len;
    }
    this.buf = this.buf.subarray(p);
    return out;
  }
}

/** After a checkpoint-reply: the primary's heartbeats, vmstate-send, vmstate-size + length, then the data. */
class ForthParser {
  private state: 'idle' | 'head' | 'data' = 'idle';
  private head = Buffer.alloc(0);
  /** data bytes of the current checkpoint seen so far, and its length */
  pos = 0;
  len = 0;
  armed(): void {
    this.state = 'head';
    this.head = Buffer.alloc(0);
  }
  /** Splits a chunk: for each byte range, whether it is checkpoint data and at which offset. */
  feed(chunk: Buffer, onData: (slice: Buffer, offset: number) => Buffer | null): Buffer[] {
    const parts: Buffer[] = [];
    let i = 0;
    while (i < chunk.length) {
      if (this.state === 'idle') {
        parts.push(chunk.subarray(i));
        break;
      }
      if (this.state === 'head') {
        const b = chunk[i++]!;
        this.head = Buffer.concat([this.head, Buffer.of(b)]);
        parts.push(Buffer.of(b));
        if (this.head.length === 4 && this.head.readUInt32BE(0) === HEARTBEAT) this.head = Buffer.alloc(0);
        else if (this.head.length === 16 && this.head.readUInt32BE(0) === SEND && this.head.readUInt32BE(4) === SIZE) {
          this.len = Number(this.head.readBigUInt64BE(8));
          this.pos = 0;
          this.state = this.len > 0 ? 'data' : 'idle';
        }
        continue;
      }
      const n = Math.min(chunk.length - i, this.len - this.pos);
      const slice = onData(Buffer.from(chunk.subarray(i, i + n)), this.pos);
      if (slice === null) return parts; // cut
      parts.push(slice);
      this.pos += n;
      i += n;
      if (this.pos === this.len) this.state = 'idle';
    }
    return parts;
  }
}

/** The link's logic, independent of how bytes move: feed each direction, act on what it says. */
export class ColoLinkControl {
  fault: LinkFault | null = null;
  frozen = false;
  private readonly back = new BackParser();
  private readonly forth = new ForthParser();
  private cutHook: () => void = () => undefined;
  /** A fault was applied (checkpoint reached). */
  applied = false;
  /** checkpoint-replies seen. */
  get replies(): number {
    return this.back.replies;
  }

  private pushForward: (b: Buffer) => void = () => undefined;

  /** Where forward bytes of the test's own go (set by the wrapper). */
  onInject(fn: (b: Buffer) => void): void {
    this.pushForward = fn;
  }

  /** Bytes of the test's own to the secondary, between the primary's (only while no checkpoint is under way). */
  injectForward(b: Buffer): void {
    this.pushForward(b);
  }

  onCut(fn: () => void): void {
    this.cutHook = fn;
  }

  cut(): void {
    this.cutHook();
  }

  freeze(): void {
    this.frozen = true;
  }

  /** Bytes the secondary sends (back to the primary). */
  backward(chunk: Buffer): Buffer | null {
    if (this.frozen) return null;
    return this.back.feed(chunk, (n, rewrite) => {
      const f = this.fault;
      if (!f || f.checkpoint !== n) return;
      if (f.rewriteReply !== undefined) {
        rewrite(f.rewriteReply);
        this.applied = true;
      } else {
        this.forth.armed();
      }
    });
  }

  /** Bytes the primary sends (forth to the secondary). */
  forward(chunk: Buffer): Buffer[] | null {
    if (this.frozen) return null;
    let cutNow = false;
    const parts = this.forth.feed(chunk, (slice, offset) => {
      const f = this.fault!;
      if (f.flipAt !== undefined && f.flipAt >= offset && f.flipAt < offset + slice.length) {
        slice[f.flipAt - offset] ^= 0xff;
        this.applied = true;
      }
      if (f.truncateAt !== undefined && offset + slice.length > f.truncateAt) {
        this.applied = true;
        cutNow = true;
        return slice.subarray(0, Math.max(0, f.truncateAt - offset));
      }
      return slice;
    });
    if (cutNow) setImmediate(() => this.cut());
    return parts;
  }
}

class Relay extends Transform {
  constructor(private readonly fn: (c: Buffer) => Buffer[] | Buffer | null) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const out = this.fn(chunk);
    if (out === null) return cb();
    for (const b of Array.isArray(out) ? out : [out]) if (b.length) this.push(b);
    cb();
  }
}

/** The link as a ChannelWrapper for the secondary (in-process pairs). */
export function coloLinkWrapper(ctl: ColoLinkControl): ChannelWrapper {
  return (inner) => {
    const input = new Relay((c) => ctl.forward(c));
    const output = new Relay((c) => ctl.backward(c));
    inner.input.pipe(input);
    output.pipe(inner.output);
    const ch = new WrappedChannel(inner, { input, output, label: 'colo-link' });
    ctl.onCut(() => {
      // both ends see the link go: the secondary's input ends, the primary's socket closes
      input.end();
      inner.close();
    });
    ctl.onInject((b) => input.push(b));
    return ch;
  };
}

/** The link as a unix-socket proxy between two processes: the primary migrates to `path`. */
export async function coloLinkProxy(ctl: ColoLinkControl, path: string, target: string): Promise<{ close(): void }> {
  const socks = new Set<net.Socket>();
  const server = net.createServer((a) => {
    const b = net.connect(target);
    socks.add(a).add(b);
    const fromA = new Relay((c) => ctl.forward(c));
    const fromB = new Relay((c) => ctl.backward(c));
    a.pipe(fromA).pipe(b);
    b.pipe(fromB).pipe(a);
    const kill = (): void => {
      a.destroy();
      b.destroy();
    };
    a.on('error', kill).on('close', kill);
    b.on('error', kill).on('close', kill);
    ctl.onCut(kill);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return {
    close() {
      server.close();
      for (const s of socks) s.destroy();
    },
  };
}

