/**
 * A fault-injecting channel wrapper (src/migration/channel/wrap.ts): the
 * bytes coming in through the wrapped channel are cut after `truncateAt`
 * bytes (the reader sees the end of the stream there), or the byte at
 * `flipAt` is XORed with `mask`. Works around any transport.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { WrappedChannel, type ChannelWrapper } from '../../src/migration/channel/index.js';

export interface Fault {
  truncateAt?: number;
  flipAt?: number;
  mask?: number;
}

class FaultRelay extends Transform {
  private seen = 0;
  private cut = false;
  constructor(private readonly fault: Fault) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    if (this.cut) return cb();
    const start = this.seen;
    this.seen += chunk.length;
    const { flipAt, truncateAt, mask = 0xff } = this.fault;
    if (flipAt !== undefined && flipAt >= start && flipAt < this.seen) {
      chunk = Buffer.from(chunk);
      chunk[flipAt - start] ^= mask;
    }
    if (truncateAt !== undefined && this.seen >= truncateAt) {
      this.cut = true;
      this.push(chunk.subarray(0, truncateAt - start));
      this.push(null);
      return cb();
    }
    cb(null, chunk);
  }
}

/** Faults on what this side reads (the migration stream, on a destination). */
export function faultyInput(fault: Fault): ChannelWrapper {
  return (inner) => {
    const relay = new FaultRelay(fault);
    inner.input.pipe(relay);
    return new WrappedChannel(inner, { input: relay, output: inner.output, label: 'fault-injector' });
  };
}

/** Every byte this side reads goes to `onData` too (the stream a destination received). */
export function tappedInput(onData: (b: Buffer) => void): ChannelWrapper {
  return (inner) => {
    const relay = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        onData(chunk);
        cb(null, chunk);
      },
    });
    inner.input.pipe(relay);
    return new WrappedChannel(inner, { input: relay, output: inner.output, label: 'tap' });
  };
}
