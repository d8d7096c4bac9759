/**
 * A fault-injecting relay between a migration source and its destination:
 * it listens on a unix socket, connects each accepted connection to the
 * destination's socket and copies both ways. On the forward direction
 * (the migration stream) it can
 *
 *   hold(from)         keep every byte from offset `from` on (forward what came before)
 *   truncate(at)       forward up to `at`, then end both connections (the destination sees EOF there)
 *   flip(at, mask)     XOR the byte at `at` with mask
 *   release()          forward what is held, with the fault applied
 *   cut()              destroy both connections at once (a cable pulled)
 *
 * Offsets count the stream from its first byte. The return path (destination
 * to source) is copied untouched.
 */
import * as net from 'node:net';

export class FaultRelay {
  private server: net.Server;
  private up: net.Socket | null = null;
  private down: net.Socket | null = null;
  /** bytes received from the source / handed to the destination */
  received = 0;
  forwarded = 0;
  private holdFrom = Infinity;
  private held: Buffer[] = [];
  private truncateAt = Infinity;
  private flipAt = -1;
  private mask = 0xff;
  private ended = false;
  private upDone = false;

  private constructor(readonly path: string, private readonly target: string) {
    this.server = net.createServer((s) => this.accept(s));
  }

  static async listen(path: string, target: string): Promise<FaultRelay> {
    const r = new FaultRelay(path, target);
    await new Promise<void>((res, rej) => {
      r.server.once('error', rej);
      r.server.listen(path, () => res());
    });
    return r;
  }

  private accept(up: net.Socket): void {
    if (this.up) {
      up.destroy();
      return;
    }
    this.up = up;
    const down = net.connect(this.target);
    this.down = down;
    up.on('error', () => this.cut());
    down.on('error', () => this.cut());
    up.on('close', () => {
      this.upDone = true;
      if (this.holdFrom === Infinity) down.end();
    });
    down.on('close', () => up.destroy());
    up.on('data', (chunk: Buffer) => {
      const start = this.received;
      this.received += chunk.length;
      if (this.received <= this.holdFrom) return this.forward(chunk, start);
      if (start < this.holdFrom) {
        const k = this.holdFrom - start;
        this.forward(chunk.subarray(0, k), start);
        this.held.push(Buffer.from(chunk.subarray(k)));
      } else this.held.push(Buffer.from(chunk));
    });
    down.pipe(up, { end: false });
  }

  private forward(chunk: Buffer, start: number): void {
    if (this.ended || chunk.length === 0) return;
    const end = start + chunk.length;
    if (this.flipAt >= start && this.flipAt < end) {
      chunk = Buffer.from(chunk);
      chunk[this.flipAt - start]! ^= this.mask;
    }
    if (end >= this.truncateAt) {
      this.ended = true;
      this.down!.write(chunk.subarray(0, this.truncateAt - start));
      this.forwarded = this.truncateAt;
      // the destination reads EOF after the cut; the source's next writes fail
      this.down!.end();
      this.up!.destroy();
      return;
    }
    this.forwarded = end;
    this.down!.write(chunk);
  }

  hold(from: number): void {
    this.holdFrom = Math.max(from, this.forwarded);
  }

  truncate(at: number): void {
    this.truncateAt = at;
  }

  flip(at: number, mask = 0xff): void {
    this.flipAt = at;
    this.mask = mask;
  }

  release(): void {
    const held = Buffer.concat(this.held);
    this.held = [];
    const start = this.holdFrom;
    this.holdFrom = Infinity;
    if (held.length) this.forward(held, start);
    if (this.upDone && !this.ended) this.down?.end();
  }

  cut(): void {
    this.ended = true;
    this.up?.destroy();
    this.down?.destroy();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
