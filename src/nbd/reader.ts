/**
 * Exact-length reads from a socket: `read(n)` resolves with the next n
 * bytes, in order, or rejects with NbdEof when the peer closed first (or
 * the socket failed). The socket is paused while more than a bounded
 * amount is buffered and nobody is reading, so a fast peer cannot make us
 * buffer without limit.
 */
import type { Socket } from 'node:net';

/** The peer closed the connection (or it failed) before the bytes a read wanted arrived. */
export class NbdEof extends Error {
  override name = 'NbdEof';
  constructor(
    readonly got: number,
    readonly wanted: number,
    readonly socketError?: Error,
  ) {
    super(socketError !== undefined ? socketError.message : got === 0 ? 'Unexpected end-of-file before all data were read' : `Connection closed after ${got} of ${wanted} bytes`);
  }
}

/** Bytes buffered beyond a waiting read before the socket is paused. */
const HIGH_WATER = 4 << 20;

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private error: Error | undefined;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;

  constructor(private readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.serve();
      if (this.buffered > HIGH_WATER && (this.waiter === null || this.waiter.n < this.buffered)) socket.pause();
    });
    socket.on('end', () => {
      this.ended = true;
      this.serve();
    });
    socket.on('close', () => {
      this.ended = true;
      this.serve();
    });
    socket.on('error', (e: Error) => {
      this.error ??= e;
      this.ended = true;
      this.serve();
    });
  }

  /** Bytes received and not yet read. */
  get available(): number {
    return this.buffered;
  }

  /** Whether the peer has closed (bytes may still be buffered). */
  get closed(): boolean {
    return this.ended;
  }

  /** The next `n` bytes. One read at a time. */
  read(n: number): Promise<Buffer> {
    if (this.waiter !== null) return Promise.reject(new Error('SocketReader: a read is already waiting'));
    if (n === 0) return Promise.resolve(Buffer.alloc(0));
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.ended) return Promise.reject(new NbdEof(this.buffered, n, this.error));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.socket.resume();
    });
  }

  /** Read and drop `n` bytes. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const k = Math.min(n, 1 << 20);
      await this.read(k);
      n -= k;
    }
  }

  private serve(): void {
    const w = this.waiter;
    if (w === null) return;
    if (this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
    } else if (this.ended) {
      this.waiter = null;
      w.reject(new NbdEof(this.buffered, w.n, this.error));
    }
  }

  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0]!;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let done = 0;
      while (done < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - done);
        c.copy(out, done, 0, k);
        done += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered <= HIGH_WATER && this.socket.isPaused() && !this.ended) this.socket.resume();
    return out;
  }
}
