/**
 * Channel: one migration connection, a byte stream in each direction.
 * The streams are the transport's own (net.Socket, child pipes, fs streams),
 * never wrapped, so the data path pays nothing extra.
 */
import { EventEmitter } from 'node:events';
import type { ChildProcess } from 'node:child_process';
import { Socket } from 'node:net';
import { Readable, Writable } from 'node:stream';
import { setSendBuffer } from '../../base/native.js';
import { ChannelError, sysError } from './errors.js';

export interface Channel {
  /** Bytes from the peer: the migration stream (incoming) or the return path (outgoing). */
  readonly input: Readable;
  /** Bytes to the peer: the migration stream (outgoing) or the return path (incoming). */
  readonly output: Writable;
  /**
   * False when the transport carries one direction only (fd: of a pipe or a
   * file). Then, outgoing, `input` ends at once (EOF), and, incoming,
   * `output` discards what is written.
   */
  readonly bidirectional: boolean;
  /**
   * True when the peer can act on the end of the stream only once our
   * direction ends: an exec: command (`cat > FILE` finishes, and closes its
   * stdout, only at EOF on its stdin). A source that waits for the return
   * path's SHUT ends its output right after its last byte on such a channel,
   * so that a command that cannot answer ends (EOF before SHUT fails the
   * migration) instead of leaving both sides waiting for ever.
   */
  readonly endOnLastByte: boolean;
  /** True once close() was called or the transport went away. */
  readonly closed: boolean;
  /** True once 'close' was emitted: every underlying resource is released (child exited). */
  readonly released: boolean;
  /** The first error seen (also emitted as 'error'), if any. */
  readonly error: ChannelError | undefined;
  /**
   * Idempotent, safe at any time: destroys both directions (pending reads
   * and writes end), kills an exec: child with SIGTERM (SIGKILL after 2 s).
   */
  close(): void;
  /** Human-readable form, e.g. "tcp:127.0.0.1:4444 (local 127.0.0.1:50000)". */
  describe(): string;
  /**
   * Keep the kernel's send queue of the channel's socket to about `bytes`
   * (SO_SNDBUF), when the peer is on this host (a unix socket or loopback
   * TCP), so that little data waits in it. Over a network the buffer is
   * left alone: there it must hold a bandwidth-delay product. False when
   * nothing was changed (no local socket, or no native addon).
   */
  limitSocketBuffers(bytes: number): boolean;
  /** Emitted once, when every underlying resource is released. */
  on(event: 'close', listener: () => void): this;
  /** The first transport error (ChannelError, QEMU-style text). Emitted only when someone listens. */
  on(event: 'error', listener: (err: ChannelError) => void): this;
  once(event: 'close', listener: () => void): this;
  once(event: 'error', listener: (err: ChannelError) => void): this;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  off(event: 'close' | 'error', listener: (...args: any[]) => void): this;
}

/** What a stream is, for error texts ("Unable to write to socket"). */
export type IoKind = 'socket' | 'command' | 'file';

export interface StreamChannelInit {
  input: Readable;
  output: Writable;
  bidirectional: boolean;
  /** See Channel.endOnLastByte (default false). */
  endOnLastByte?: boolean;
  ioKind: IoKind;
  describe: () => string;
  /** Real resources: the channel is over when all of them emitted 'close'. */
  resources: ReadonlyArray<Readable | Writable>;
  /** Stand-in streams (one-way channels): destroyed on close, not waited for. */
  dummies?: ReadonlyArray<Readable | Writable>;
  child?: ChildProcess;
}

const KILL_GRACE_MS = 2000;

export class StreamChannel extends EventEmitter implements Channel {
  readonly input: Readable;
  readonly output: Writable;
  readonly bidirectional: boolean;
  readonly endOnLastByte: boolean;
  #describe: () => string;
  #resources: ReadonlyArray<Readable | Writable>;
  #dummies: ReadonlyArray<Readable | Writable>;
  #child: ChildProcess | undefined;
  #ioKind: IoKind;
  #open = 0;
  #closeRequested = false;
  #closeEmitted = false;
  #error: ChannelError | undefined;
  #killTimer: NodeJS.Timeout | undefined;

  constructor(init: StreamChannelInit) {
    super();
    this.input = init.input;
    this.output = init.output;
    this.bidirectional = init.bidirectional;
    this.endOnLastByte = init.endOnLastByte ?? false;
    this.#describe = init.describe;
    this.#resources = [...new Set(init.resources)];
    this.#dummies = init.dummies ?? [];
    this.#child = init.child;
    this.#ioKind = init.ioKind;

    for (const s of this.#resources) {
      const dir = s === this.output && s !== (this.input as unknown) ? 'write' : s === this.input && s !== (this.output as unknown) ? 'read' : 'duplex';
      s.on('error', (err: Error) => this.#onStreamError(err, dir));
      if (s.closed) continue;
      this.#open++;
      s.once('close', () => this.#released());
    }
    for (const s of this.#dummies) s.on('error', () => {});
    const child = this.#child;
    if (child !== undefined) {
      child.on('error', (err: Error) => this.#fail(sysError('Unable to signal command', err)));
      if (child.exitCode === null && child.signalCode === null) {
        this.#open++;
        child.once('exit', (code, signal) => {
          if (this.#killTimer !== undefined) clearTimeout(this.#killTimer);
          if (!this.#closeRequested) {
            if (signal !== null) this.#fail(new ChannelError(`Command terminated by signal ${signal}`, 'ECHILD'));
            else if (code !== 0) this.#fail(new ChannelError(`Command exited with status ${code}`, 'ECHILD'));
          }
          this.#released();
        });
      }
    }
    if (this.#open === 0) queueMicrotask(() => this.#released(true));
  }

  get closed(): boolean {
    return this.#closeRequested || this.#closeEmitted;
  }

  limitSocketBuffers(bytes: number): boolean {
    let done = false;
    for (const s of this.#resources) {
      if (!(s instanceof Socket)) continue;
      const remote = s.remoteAddress;
      const local = remote === undefined || remote === '::1' || /^(::ffff:)?127\./.test(remote);
      const fd = (s as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
      if (local && typeof fd === 'number' && fd >= 0 && setSendBuffer(fd, bytes)) done = true;
    }
    return done;
  }

  get released(): boolean {
    return this.#closeEmitted;
  }

  get error(): ChannelError | undefined {
    return this.#error;
  }

  describe(): string {
    return this.#describe();
  }

  close(): void {
    if (this.#closeRequested) return;
    this.#closeRequested = true;
    for (const s of this.#resources) s.destroy();
    for (const s of this.#dummies) s.destroy();
    const child = this.#child;
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      killTree(child, 'SIGTERM');
      // A child that ignores SIGTERM gets SIGKILL; one that survives even
      // that (uninterruptible sleep) must not keep this process alive.
      this.#killTimer = setTimeout(() => {
        if (child.exitCode === null && child.signalCode === null) killTree(child, 'SIGKILL');
        child.unref();
      }, KILL_GRACE_MS);
      this.#killTimer.unref();
    }
  }

  #onStreamError(err: Error, dir: 'read' | 'write' | 'duplex'): void {
    if (this.#closeRequested) return;
    const code = (err as { code?: string }).code;
    let verb: 'read from' | 'write to';
    if (dir === 'duplex') verb = code === 'EPIPE' || code === 'ERR_STREAM_WRITE_AFTER_END' ? 'write to' : 'read from';
    else verb = dir === 'read' ? 'read from' : 'write to';
    this.#fail(sysError(`Unable to ${verb} ${this.#ioKind}`, err));
  }

  #fail(err: ChannelError): void {
    if (this.#error !== undefined) return;
    this.#error = err;
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  #released(all = false): void {
    if (!all) this.#open--;
    if (this.#open > 0 || this.#closeEmitted) return;
    this.#closeEmitted = true;
    for (const s of this.#dummies) s.destroy();
    this.emit('close');
  }
}

/**
 * Signals an exec: child. It runs in its own process group (spawned
 * detached), so commands the shell forked (`cat > f; sync`, pipelines) die
 * with it instead of keeping our stdio open.
 */
export function killTree(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid !== undefined) {
    try {
      process.kill(-child.pid, signal);
      return;
    } catch {
      /* not a group leader (or gone): fall back to the process itself */
    }
  }
  try {
    child.kill(signal);
  } catch {
    /* already gone */
  }
}

/** Return-path stand-in for a one-way outgoing channel: EOF when read. */
export function endedReadable(): Readable {
  return new Readable({
    read() {
      this.push(null);
    },
  });
}

/** Return-path stand-in for a one-way incoming channel: swallows writes. */
export function discardWritable(): Writable {
  return new Writable({
    write(_chunk, _enc, cb) {
      cb();
    },
  });
}
