/**
 * The worker-thread half of a TLS session (tls-offload.ts is the other):
 * it opens the migration socket on its own descriptor (a dup), runs node:tls
 * over it (the handshake, then every record encrypted and decrypted here),
 * and trades plain text with the main thread by message, each chunk's
 * ArrayBuffer transferred, not copied.
 *
 * Main → worker: start, data (plain text to send), end, ack (plain text the
 * main thread consumed), destroy. Worker → main: secure, data (plain text
 * received, batched), written, end, finished, error, close.
 */
import { Socket } from 'node:net';
import * as tls from 'node:tls';
import { parentPort } from 'node:worker_threads';
import { pskCallbackOptions, type PskSecret } from '../../crypto/tls-creds.js';

export interface TlsWorkerStart {
  t: 'start';
  /** A descriptor of the connected socket that this thread owns (and closes). */
  fd: number;
  side: 'outgoing' | 'incoming';
  /** The credentials' node:tls options, without functions. */
  options: Record<string, unknown>;
  psk?: PskSecret;
  /** Client only: SNI, and whether (and against what) to check the server's names. */
  servername?: string;
  checkHostname?: string;
  /** Bytes the main thread had already read from the socket. */
  initial: Uint8Array | null;
}

export type ToWorker =
  | TlsWorkerStart
  | { t: 'data'; buf: ArrayBuffer }
  | { t: 'end' }
  | { t: 'ack'; n: number }
  | { t: 'destroy' };

export type FromWorker =
  | { t: 'secure'; authorized: boolean; authorizationError: string | null; protocol: string | null; cipher: string | null }
  | { t: 'data'; buf: ArrayBuffer }
  | { t: 'written'; n: number }
  | { t: 'end' }
  | { t: 'finished' }
  | { t: 'error'; code?: string; message: string; reason?: string }
  | { t: 'close' };

/** Received plain text is batched up to this much per message. */
const BATCH = 512 * 1024;
/** Reading from TLS stops while this much sent to the main thread is unconsumed. */
const UNACKED_MAX = 8 * 1024 * 1024;

function run(port: NonNullable<typeof parentPort>): void {
  let sec: tls.TLSSocket | undefined;
  let raw: Socket | undefined;
  let closed = false;
  let unacked = 0;
  let batch: Buffer[] = [];
  let batchBytes = 0;
  let flushQueued = false;
  const post = (m: FromWorker, transfer?: ArrayBuffer[]): void => port.postMessage(m, transfer ?? []);

  const flush = (): void => {
    flushQueued = false;
    if (batchBytes === 0) return;
    const ab = new ArrayBuffer(batchBytes);
    const out = new Uint8Array(ab);
    let off = 0;
    for (const b of batch) {
      out.set(b, off);
      off += b.length;
    }
    unacked += batchBytes;
    batch = [];
    batchBytes = 0;
    post({ t: 'data', buf: ab }, [ab]);
    if (unacked > UNACKED_MAX) sec?.pause();
  };
  const onData = (b: Buffer): void => {
    batch.push(b);
    batchBytes += b.length;
    if (batchBytes >= BATCH) flush();
    else if (!flushQueued) {
      flushQueued = true;
      setImmediate(flush);
    }
  };
  const onError = (e: Error): void => {
    flush();
    const err = e as NodeJS.ErrnoException & { reason?: string };
    post({ t: 'error', code: err.code, message: err.message, ...(err.reason !== undefined ? { reason: String(err.reason) } : {}) });
  };
  const onClose = (): void => {
    if (closed) return;
    closed = true;
    flush();
    post({ t: 'close' });
  };
  const attach = (s: tls.TLSSocket): void => {
    sec = s;
    s.on('data', onData);
    s.once('end', () => {
      flush();
      post({ t: 'end' });
    });
    s.once('finish', () => post({ t: 'finished' }));
  };
  const secure = (s: tls.TLSSocket): void => {
    const c = s.getCipher() as { name?: string } | undefined;
    post({
      t: 'secure',
      authorized: s.authorized,
      authorizationError: s.authorizationError === undefined || s.authorizationError === null ? null : String(s.authorizationError),
      protocol: s.getProtocol(),
      cipher: c?.name ?? null,
    });
  };

  const start = (m: TlsWorkerStart): void => {
    const r = new Socket({ fd: m.fd, readable: true, writable: true });
    raw = r;
    if (m.initial !== null && m.initial.length > 0) r.unshift(Buffer.from(m.initial.buffer, m.initial.byteOffset, m.initial.length));
    r.on('error', () => undefined);
    r.once('close', onClose);
    const psk = m.psk !== undefined ? pskCallbackOptions(m.psk) : {};
    if (m.side === 'outgoing') {
      const check = m.checkHostname;
      const s = tls.connect({
        ...(m.options as tls.ConnectionOptions),
        ...(psk as tls.ConnectionOptions),
        socket: r,
        ...(m.servername !== undefined ? { servername: m.servername } : {}),
        checkServerIdentity: (_host, cert) => (check !== undefined ? tls.checkServerIdentity(check, cert) : undefined),
      });
      attach(s);
      s.on('error', onError);
      s.once('close', onClose);
      s.once('secureConnect', () => secure(s));
    } else {
      const server = tls.createServer({ ...(m.options as tls.TlsOptions), ...(psk as tls.TlsOptions) });
      server.once('tlsClientError', (e: Error, s: tls.TLSSocket) => {
        sec = s;
        onError(e);
      });
      server.once('secureConnection', (s: tls.TLSSocket) => {
        attach(s);
        s.on('error', onError);
        s.once('close', onClose);
        secure(s);
      });
      server.emit('connection', r);
    }
  };

  port.on('message', (m: ToWorker) => {
    switch (m.t) {
      case 'start':
        start(m);
        break;
      case 'data': {
        const n = m.buf.byteLength;
        sec?.write(Buffer.from(m.buf), () => post({ t: 'written', n }));
        break;
      }
      case 'end':
        sec?.end();
        break;
      case 'ack':
        unacked -= m.n;
        if (unacked <= UNACKED_MAX / 2 && sec?.isPaused()) sec.resume();
        break;
      case 'destroy':
        sec?.on('error', () => undefined);
        sec?.destroy();
        raw?.destroy();
        if (sec === undefined && raw === undefined) onClose();
        break;
    }
  });
}

if (parentPort !== null) run(parentPort);
