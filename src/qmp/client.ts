/**
 * QMP client: connects to a monitor (ours or QEMU's), reads the greeting,
 * negotiates, runs commands matched by id, records events.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { parseClientTarget, QmpAddress } from './address.js';
import { JsonStreamParser, JsonValue, toQmpJson } from './json.js';
import { writeWithFds } from './scm-rights.js';
import { QmpEventMessage, QmpGreeting } from './types.js';

export type QmpTarget = string | { path: string } | { host: string; port: number };

export interface QmpConnectOptions {
  /** Give up connecting / waiting for the greeting after this (default 10 s). */
  timeoutMs?: number;
  /** Run qmp_capabilities right after the greeting (default false). */
  negotiate?: boolean;
  /** Keep at most this many events in `eventLog` (default 10000, oldest dropped). */
  maxEventLog?: number;
}

export interface QmpExecuteOptions {
  /** Reject with a timeout error if no reply arrives in time (default: none). */
  timeoutMs?: number;
  /**
   * File descriptors to pass with the command (SCM_RIGHTS, unix sockets,
   * needs the native addon), e.g. for `getfd`.
   */
  fds?: number[];
}

/** A command answered with {"error": ...}. */
export class QmpCommandError extends Error {
  constructor(
    readonly errorClass: string,
    readonly desc: string,
    readonly command?: string,
  ) {
    super(`${errorClass}: ${desc}`);
    this.name = 'QmpCommandError';
  }
}

export type QmpEvent = QmpEventMessage;

interface Pending {
  command: string;
  resolve(v: unknown): void;
  reject(e: Error): void;
  timer?: NodeJS.Timeout;
}

export interface QmpClientEvents {
  /** every event, in arrival order */
  event: [QmpEvent];
  /** a reply whose id is not one of ours (e.g. answers to sendRaw) */
  reply: [Record<string, unknown>];
  /** every message from the server, as parsed */
  message: [Record<string, unknown>];
  close: [];
}

function toAddress(target: QmpTarget): QmpAddress {
  if (typeof target === 'string') return parseClientTarget(target);
  if ('path' in target) return { kind: 'unix', path: target.path };
  return { kind: 'tcp', host: target.host, port: target.port };
}

export class QmpClient {
  /** Emits 'event' for every event and also the event's own name (e.g. 'STOP'). */
  readonly events = new EventEmitter();
  /** Every event received so far (bounded by maxEventLog). */
  readonly eventLog: QmpEvent[] = [];
  /** Replies, events, unmatched replies, close. */
  readonly messages = new EventEmitter<QmpClientEvents>();
  readonly greeting: QmpGreeting;

  private readonly sock: net.Socket;
  private readonly parser = new JsonStreamParser();
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedFlag = false;
  private readonly maxEventLog: number;
  /** Resolves when the connection has closed. */
  readonly closed: Promise<void>;

  private constructor(sock: net.Socket, greeting: QmpGreeting, leftover: Buffer, opts: QmpConnectOptions) {
    this.sock = sock;
    this.greeting = greeting;
    this.maxEventLog = opts.maxEventLog ?? 10000;
    this.events.on('error', () => {
      /* never throw from emit('error') */
    });
    this.closed = new Promise<void>((resolve) => {
      sock.on('close', () => {
        this.closedFlag = true;
        const err = new Error('QMP connection closed');
        for (const p of this.pending.values()) {
          if (p.timer) clearTimeout(p.timer);
          p.reject(err);
        }
        this.pending.clear();
        this.messages.emit('close');
        resolve();
      });
    });
    sock.on('data', (b: Buffer) => this.onData(b));
    if (leftover.length) this.onData(leftover);
  }

  /** Connect, read the greeting, optionally negotiate. */
  static async connect(target: QmpTarget, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const addr = toAddress(target);
    const timeoutMs = opts.timeoutMs ?? 10000;
    const sock =
      addr.kind === 'unix'
        ? net.createConnection({ path: addr.path })
        : net.createConnection({ host: addr.host, port: addr.port });
    const where = addr.kind === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
    const { greeting, leftover } = await new Promise<{ greeting: QmpGreeting; leftover: Buffer }>((resolve, reject) => {
      let buf: Buffer = Buffer.alloc(0);
      const timer = setTimeout(() => {
        cleanup();
        sock.destroy();
        reject(new Error(`QMP ${where}: no greeting within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        sock.off('data', onData);
        sock.off('error', onError);
        sock.off('close', onClose);
      };
      const onError = (e: Error) => {
        cleanup();
        sock.destroy();
        reject(new Error(`QMP ${where}: ${e.message}`));
      };
      const onClose = () => {
        cleanup();
        reject(new Error(`QMP ${where}: connection closed before the greeting`));
      };
      const onData = (b: Buffer) => {
        buf = buf.length ? Buffer.concat([buf, b]) : b;
        let nl = buf.indexOf(0x0a);
        let g: unknown;
        for (;;) {
          if (nl < 0) {
            if (buf.length > 1 << 20) onError(new Error('greeting too long'));
            return;
          }
          try {
            g = JSON.parse(buf.subarray(0, nl).toString('utf8'));
          } catch {
            g = undefined;
          }
          // QEMU 7.2 started with -incoming can write its incoming MIGRATION
          // event on a fresh connection before the greeting: skip such lines
          if (!g || typeof g !== 'object' || !('event' in g) || 'QMP' in g) break;
          buf = buf.subarray(nl + 1);
          nl = buf.indexOf(0x0a);
        }
        cleanup();
        sock.pause();
        if (!g || typeof g !== 'object' || !('QMP' in g)) {
          sock.destroy();
          reject(new Error(`QMP ${where}: not a QMP greeting: ${buf.subarray(0, Math.min(nl, 200)).toString()}`));
          return;
        }
        resolve({ greeting: g as QmpGreeting, leftover: buf.subarray(nl + 1) });
      };
      sock.on('data', onData);
      sock.on('error', onError);
      sock.on('close', onClose);
    });
    sock.on('error', () => {
      /* 'close' follows */
    });
    if (addr.kind === 'tcp') sock.setNoDelay(true);
    const client = new QmpClient(sock, greeting, leftover, opts);
    sock.resume();
    if (opts.negotiate) {
      try {
        await client.negotiate();
      } catch (e) {
        client.destroy();
        throw e;
      }
    }
    return client;
  }

  /** Run qmp_capabilities (optionally enabling capabilities). */
  async negotiate(enable?: string[]): Promise<void> {
    await this.execute('qmp_capabilities', enable ? { enable } : undefined);
  }

  /** Run a command; resolves with `return`, rejects with QmpCommandError. */
  execute<T = unknown>(command: string, args?: object, opts: QmpExecuteOptions = {}): Promise<T> {
    if (this.closedFlag) return Promise.reject(new Error('QMP connection closed'));
    const id = this.nextId++;
    const msg: Record<string, unknown> = { execute: command };
    if (args !== undefined) msg.arguments = args;
    msg.id = id;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { command, resolve: resolve as (v: unknown) => void, reject };
      if (opts.timeoutMs !== undefined) {
        p.timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new Error(`QMP command '${command}' timed out after ${opts.timeoutMs} ms`));
        }, opts.timeoutMs);
      }
      this.pending.set(id, p);
      const line = toQmpJson(msg) + '\n';
      if (opts.fds && opts.fds.length) {
        writeWithFds(this.sock, Buffer.from(line), opts.fds).catch((e: Error) => {
          this.pending.delete(id);
          if (p.timer) clearTimeout(p.timer);
          reject(e);
        });
      } else {
        this.sock.write(line);
      }
    });
  }

  /** Send raw text (answers arrive on messages 'reply'). */
  sendRaw(text: string | Buffer): void {
    if (!this.closedFlag) this.sock.write(text);
  }

  /**
   * Wait for an event called `name` (matching `predicate`). Only events
   * arriving after the call count unless `opts.past` is set, in which case
   * the recorded log is searched first (from index `opts.since`, default 0).
   */
  waitEvent(
    name: string,
    predicate?: (ev: QmpEvent) => boolean,
    timeoutMs = 10000,
    opts: { past?: boolean; since?: number } = {},
  ): Promise<QmpEvent> {
    const match = (ev: QmpEvent) => ev.event === name && (!predicate || predicate(ev));
    if (opts.past) {
      for (let i = opts.since ?? 0; i < this.eventLog.length; i++) {
        const ev = this.eventLog[i]!;
        if (match(ev)) return Promise.resolve(ev);
      }
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const onEvent = (ev: QmpEvent) => {
        if (!match(ev)) return;
        done();
        resolve(ev);
      };
      const onClose = () => {
        done();
        reject(new Error(`QMP connection closed while waiting for event ${name}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for event ${name}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.events.off('event', onEvent);
        this.messages.off('close', onClose);
      };
      this.events.on('event', onEvent);
      this.messages.on('close', onClose);
      if (this.closedFlag) onClose();
    });
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  /** Close the connection (pending commands reject). */
  async close(): Promise<void> {
    if (!this.closedFlag) this.sock.end();
    const t = setTimeout(() => this.sock.destroy(), 1000);
    await this.closed;
    clearTimeout(t);
  }

  /** Drop the connection at once. */
  destroy(): void {
    this.sock.destroy();
  }

  private onData(b: Buffer): void {
    for (const r of this.parser.feed(b)) {
      if (!r.ok) continue; // the server only sends valid JSON
      this.onMessage(r.value);
    }
  }

  private onMessage(v: JsonValue): void {
    if (!v || typeof v !== 'object' || Array.isArray(v)) return;
    const m = v as Record<string, unknown>;
    this.messages.emit('message', m);
    if (typeof m.event === 'string') {
      const ev = m as unknown as QmpEvent;
      this.eventLog.push(ev);
      if (this.eventLog.length > this.maxEventLog) this.eventLog.splice(0, this.eventLog.length - this.maxEventLog);
      this.events.emit('event', ev);
      if (ev.event !== 'event' && ev.event !== 'error') this.events.emit(ev.event, ev);
      return;
    }
    const id = m.id;
    const p = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!p) {
      this.messages.emit('reply', m);
      return;
    }
    this.pending.delete(id as number);
    if (p.timer) clearTimeout(p.timer);
    if ('error' in m) {
      const e = (m.error ?? {}) as { class?: unknown; desc?: unknown };
      p.reject(new QmpCommandError(String(e.class ?? 'GenericError'), String(e.desc ?? ''), p.command));
    } else {
      p.resolve(m.return);
    }
  }
}
