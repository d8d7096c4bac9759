/**
 * A deliberately dumb QMP wire client for protocol tests: it keeps every raw
 * chunk as received, splits server output on "\r\n" itself and never
 * negotiates on its own, so tests can look at exactly what went over the
 * socket.
 */
import * as net from 'node:net';

export type RawTarget = string | { host: string; port: number };

export interface RawMessage {
  /** the line as received, without its "\r\n" */
  line: string;
  value: Record<string, any>;
  /** index of the data chunk whose bytes completed this line */
  chunk: number;
}

export class RawQmp {
  readonly chunks: Buffer[] = [];
  readonly messages: RawMessage[] = [];
  private buf = '';
  private readIdx = 0;
  private waiters: (() => void)[] = [];
  closed = false;
  readonly closedP: Promise<void>;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buf += b.toString('latin1');
      for (;;) {
        const i = this.buf.indexOf('\r\n');
        if (i < 0) break;
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        let value: Record<string, any>;
        try {
          value = JSON.parse(line);
        } catch {
          value = { __unparsable: line };
        }
        this.messages.push({ line, value, chunk: this.chunks.length - 1 });
      }
      this.wake();
    });
    sock.on('error', () => {});
    this.closedP = new Promise((res) =>
      sock.once('close', () => {
        this.closed = true;
        this.wake();
        res();
      }),
    );
  }

  static connect(target: RawTarget, timeoutMs = 5000): Promise<RawQmp> {
    return new Promise((resolve, reject) => {
      const sock = typeof target === 'string' ? net.connect(target) : net.connect(target.port, target.host);
      const t = setTimeout(() => {
        sock.destroy();
        reject(new Error('connect timeout'));
      }, timeoutMs);
      sock.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
      sock.once('connect', () => {
        clearTimeout(t);
        resolve(new RawQmp(sock));
      });
    });
  }

  private wake(): void {
    const w = this.waiters.splice(0);
    for (const f of w) f();
  }

  /** Wait until pred() is true (re-checked on every data/close). */
  async until<T>(pred: () => T | undefined | false | null, timeoutMs = 5000, what = 'data'): Promise<T> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const v = pred();
      if (v) return v;
      if (this.closed) throw new Error(`connection closed while waiting for ${what}`);
      const left = end - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, left);
        this.waiters.push(() => {
          clearTimeout(t);
          res();
        });
      });
    }
  }

  /** The next message not yet consumed (events included). */
  async next(timeoutMs = 5000): Promise<RawMessage> {
    const m = await this.until(() => this.messages[this.readIdx], timeoutMs, 'a message');
    this.readIdx++;
    return m;
  }

  /** The next reply (return/error), skipping events (they stay in `events`). */
  async reply(timeoutMs = 5000): Promise<Record<string, any>> {
    for (;;) {
      const m = await this.next(timeoutMs);
      if (!('event' in m.value)) return m.value;
    }
  }

  get events(): Record<string, any>[] {
    return this.messages.filter((m) => 'event' in m.value).map((m) => m.value);
  }

  send(data: string | Buffer): Promise<void> {
    return new Promise((res, rej) => this.sock.write(data, (e) => (e ? rej(e) : res())));
  }

  /** Send one command and return its reply. */
  async cmd(execute: string, args?: object, id?: unknown): Promise<Record<string, any>> {
    const o: Record<string, unknown> = { execute };
    if (args !== undefined) o.arguments = args;
    if (id !== undefined) o.id = id;
    await this.send(JSON.stringify(o) + '\n');
    return this.reply();
  }

  /** Read the greeting and negotiate. */
  async negotiate(): Promise<Record<string, any>> {
    const g = await this.next();
    if (!('QMP' in g.value)) throw new Error(`expected greeting, got ${g.line}`);
    const r = await this.cmd('qmp_capabilities');
    if (!('return' in r)) throw new Error(`negotiation failed: ${JSON.stringify(r)}`);
    return g.value;
  }

  close(): void {
    this.sock.destroy();
  }
}

/** A free TCP port on 127.0.0.1 (bound then released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address() as net.AddressInfo;
      s.close(() => resolve(a.port));
    });
  });
}

/** RSS of a process in bytes, from /proc (Linux). */
export async function rssOf(pid: number): Promise<number> {
  const { readFileSync } = await import('node:fs');
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+)\s+kB/.exec(s);
  if (!m) throw new Error('no VmRSS');
  return Number(m[1]) * 1024;
}
