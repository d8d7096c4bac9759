/**
 * A TLS session run in a worker thread (tls-worker.ts), so that record
 * encryption and decryption do not share the main thread with the page scan,
 * the encoders and the loader. The main thread sees a Duplex of plain text,
 * with the few parts of tls.TLSSocket that tls.ts uses (authorized,
 * authorizationError, getProtocol, getCipher, and 'secure' for
 * 'secureConnect'). The worker runs node:tls over its own duplicate of the
 * socket's descriptor, so the ciphertext never comes back to this thread.
 *
 * Used when the channel is one socket with a descriptor (tcp:, unix:, fd: of
 * a socket) and the scm-rights addon can dup() it; otherwise (exec:'s two
 * pipes, no addon, FERRY_NO_NATIVE=1, FERRY_TLS_WORKER=0) tls.ts runs
 * node:tls on the main thread as before.
 */
import { createRequire } from 'node:module';
import { Socket } from 'node:net';
import { resolve } from 'node:path';
import { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { PskSecret } from '../../crypto/tls-creds.js';
import type { Channel } from './channel.js';
import type { FromWorker, TlsWorkerStart, ToWorker } from './tls-worker.js';

/** Plain text handed to the worker and not yet written; writes wait above this. */
const INFLIGHT_MAX = 8 * 1024 * 1024;

interface DupAddon {
  dup(fd: number): number;
}
let dupAddon: DupAddon | null | undefined;

function loadDup(): DupAddon | null {
  if (dupAddon !== undefined) return dupAddon;
  dupAddon = null;
  if (process.env.FERRY_NO_NATIVE === '1') return null;
  try {
    const root = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../../..');
    const a = createRequire(import.meta.url)(resolve(root, 'native/scm-rights/build/Release/ferry_scm.node')) as Partial<DupAddon>;
    if (typeof a.dup === 'function') dupAddon = a as DupAddon;
  } catch {
    dupAddon = null;
  }
  return dupAddon;
}

interface ReadHandle {
  fd?: number;
  reading?: boolean;
  readStop?: () => number;
}

/** The channel's socket, when a worker can take its session over; undefined otherwise. */
export function offloadableSocket(inner: Channel): Socket | undefined {
  if (process.env.FERRY_TLS_WORKER === '0') return undefined;
  const s = inner.input as unknown;
  if (s !== inner.output || !(s instanceof Socket) || s.destroyed || s.connecting) return undefined;
  const h = (s as unknown as { _handle?: ReadHandle | null })._handle;
  if (h === null || h === undefined || typeof h.fd !== 'number' || h.fd < 0 || typeof h.readStop !== 'function') return undefined;
  return loadDup() !== null ? s : undefined;
}

export interface OffloadSpec {
  side: 'outgoing' | 'incoming';
  options: object;
  psk?: PskSecret;
  servername?: string;
  checkHostname?: string;
}

/** node:tls options that can cross to a worker: functions are dropped (psk travels in spec.psk). */
function plainOptions(o: object): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (typeof v !== 'function') out[k] = v;
  return out;
}

/**
 * The plain-text side of a session whose TLS runs in a worker. Emits
 * 'secure' once the handshake is done, 'error' with node:tls's error (code,
 * message, reason), and 'close' when the worker's socket is gone.
 */
export class WorkerTlsSocket extends Duplex {
  authorized = false;
  authorizationError: string | undefined;
  #protocol: string | null = null;
  #cipher: string | null = null;
  #worker: Worker;
  #raw: Socket;
  #gone = false;
  #inflight = 0;
  #waitingWrite: ((e?: Error | null) => void) | undefined;
  #finalCb: ((e?: Error | null) => void) | undefined;
  #unacked = 0;
  #gotEnd = false;

  constructor(raw: Socket, spec: OffloadSpec) {
    super({ readableHighWaterMark: 1024 * 1024, writableHighWaterMark: 1024 * 1024, allowHalfOpen: true });
    this.#raw = raw;
    // stop reading here: from now on the worker reads this socket; what was read already goes along
    const h = (raw as unknown as { _handle: ReadHandle })._handle;
    raw.pause();
    const got: Buffer[] = [];
    for (let b = raw.read() as Buffer | null; b !== null; b = raw.read() as Buffer | null) got.push(b);
    h.reading = false;
    h.readStop!();
    const initial = got.length > 0 ? Buffer.concat(got) : null;
    const fd = loadDup()!.dup(h.fd!);
    if (fd < 0) throw new Error(`dup: errno ${-fd}`);
    this.#worker = new Worker(new URL('./tls-worker.js', import.meta.url));
    this.#worker.on('message', (m: FromWorker) => this.#onMessage(m));
    this.#worker.on('error', (e) => this.destroy(e));
    this.#worker.once('exit', () => {
      if (!this.#gone) this.#onMessage({ t: 'close' });
    });
    const start: TlsWorkerStart = {
      t: 'start',
      fd,
      side: spec.side,
      options: plainOptions(spec.options),
      ...(spec.psk !== undefined ? { psk: spec.psk } : {}),
      ...(spec.servername !== undefined ? { servername: spec.servername } : {}),
      ...(spec.checkHostname !== undefined ? { checkHostname: spec.checkHostname } : {}),
      initial,
    };
    this.#post(start);
  }

  getProtocol(): string | null {
    return this.#protocol;
  }

  getCipher(): { name: string } | undefined {
    return this.#cipher === null ? undefined : { name: this.#cipher };
  }

  #post(m: ToWorker, transfer?: ArrayBuffer[]): void {
    if (!this.#gone) this.#worker.postMessage(m, transfer ?? []);
  }

  #onMessage(m: FromWorker): void {
    switch (m.t) {
      case 'secure':
        this.authorized = m.authorized;
        this.authorizationError = m.authorizationError ?? undefined;
        this.#protocol = m.protocol;
        this.#cipher = m.cipher;
        this.emit('secure');
        break;
      case 'data': {
        const n = m.buf.byteLength;
        if (this.push(Buffer.from(m.buf))) this.#post({ t: 'ack', n });
        else this.#unacked += n;
        break;
      }
      case 'written':
        this.#inflight -= m.n;
        if (this.#waitingWrite !== undefined && this.#inflight <= INFLIGHT_MAX) {
          const cb = this.#waitingWrite;
          this.#waitingWrite = undefined;
          cb();
        }
        break;
      case 'end':
        this.#gotEnd = true;
        this.push(null);
        break;
      case 'finished': {
        const cb = this.#finalCb;
        this.#finalCb = undefined;
        cb?.();
        break;
      }
      case 'error':
        this.destroy(Object.assign(new Error(m.message), { code: m.code, ...(m.reason !== undefined ? { reason: m.reason } : {}) }));
        break;
      case 'close':
        if (this.#gone) return;
        this.#gone = true;
        void this.#worker.terminate();
        this.#raw.destroy();
        // like a socket, close only once what arrived has been read
        if (this.#gotEnd && !this.readableEnded && !this.destroyed) this.once('end', () => this.destroy());
        else this.destroy();
        break;
    }
  }

  override _read(): void {
    if (this.#unacked > 0) {
      this.#post({ t: 'ack', n: this.#unacked });
      this.#unacked = 0;
    }
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (e?: Error | null) => void): void {
    let n = 0;
    for (const c of chunks) n += c.chunk.length;
    const ab = new ArrayBuffer(n);
    const out = Buffer.from(ab);
    let off = 0;
    for (const c of chunks) off += c.chunk.copy(out, off);
    this.#inflight += n;
    this.#post({ t: 'data', buf: ab }, [ab]);
    if (this.#inflight <= INFLIGHT_MAX) cb();
    else this.#waitingWrite = cb;
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this._writev([{ chunk }], cb);
  }

  override _final(cb: (e?: Error | null) => void): void {
    if (this.#gone) return cb(Object.assign(new Error('write after end'), { code: 'EPIPE' }));
    this.#finalCb = cb;
    this.#post({ t: 'end' });
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (!this.#gone) {
      this.#post({ t: 'destroy' });
      // the worker answers 'close' once its socket is closed; do not wait for ever
      const t = setTimeout(() => this.#onMessage({ t: 'close' }), 2000);
      t.unref();
      this.#worker.once('exit', () => clearTimeout(t));
    }
    const w = this.#waitingWrite;
    this.#waitingWrite = undefined;
    w?.(err ?? Object.assign(new Error('Cannot call write after a stream was destroyed'), { code: 'ERR_STREAM_DESTROYED' }));
    cb(err);
  }

  /** Lets the stream writer reuse its buffers: every write is copied before its callback. */
  readonly copiesWrites = true;
}
