/**
 * The one seam where a wrapper goes around any transport: TLS, a fault
 * injector, a byte counter. A ChannelWrapper gets the transport's channel
 * and returns a channel whose streams are its own (a TLSSocket over the
 * socket, a relay that truncates or flips bytes...). Both sessions open
 * their channel through openOutgoing/acceptIncoming, so a wrapper applies
 * to tcp:, unix:, exec: and fd: alike and the engine above never knows.
 */
import { EventEmitter } from 'node:events';
import type { Readable, Writable } from 'node:stream';
import type { Channel } from './channel.js';
import { ChannelError } from './errors.js';
import { connectOutgoing, type ConnectOptions, type IncomingListener } from './transports.js';
import type { MigrationUri } from './uri.js';

export type ChannelSide = 'outgoing' | 'incoming';

/** Wraps a channel; may reject (a failed handshake), and then the caller closes the inner channel. */
export type ChannelWrapper = (inner: Channel, side: ChannelSide) => Channel | Promise<Channel>;

export interface WrappedStreams {
  /** Bytes from the peer, after the wrapper. */
  input: Readable;
  /** Bytes to the peer, before the wrapper. */
  output: Writable;
  /** Shown in describe(): "<label> over <inner>". */
  label: string;
  /** The error text for a failure of the wrapper's streams (default "<label>: <message>"). */
  describeError?: (e: Error) => string;
}

/**
 * A channel made of a wrapper's streams over an inner channel. close()
 * destroys the wrapper's streams and closes the inner channel; it is
 * released when the inner channel is; limitSocketBuffers and bidirectional
 * are the inner channel's.
 */
export class WrappedChannel extends EventEmitter implements Channel {
  readonly input: Readable;
  readonly output: Writable;
  #inner: Channel;
  #label: string;
  #closed = false;
  #error: ChannelError | undefined;

  constructor(inner: Channel, streams: WrappedStreams) {
    super();
    this.#inner = inner;
    this.input = streams.input;
    this.output = streams.output;
    this.#label = streams.label;
    const describeError = streams.describeError ?? ((e: Error) => `${this.#label}: ${e.message}`);
    const onStreamError = (e: Error): void => {
      if (this.#closed) return;
      this.#fail(e instanceof ChannelError ? e : new ChannelError(describeError(e), (e as NodeJS.ErrnoException).code, { cause: e }));
    };
    this.input.on('error', onStreamError);
    if (this.output !== (this.input as unknown)) this.output.on('error', onStreamError);
    inner.on('error', (e) => this.#fail(e));
    inner.once('close', () => this.emit('close'));
  }

  get bidirectional(): boolean {
    return this.#inner.bidirectional;
  }

  /**
   * Never: ending a wrapper's output is the wrapper's own message (TLS sends
   * close_notify, and a peer may then close both directions), not a plain EOF.
   */
  get endOnLastByte(): boolean {
    return false;
  }

  get closed(): boolean {
    return this.#closed || this.#inner.closed;
  }

  get released(): boolean {
    return this.#inner.released;
  }

  get error(): ChannelError | undefined {
    return this.#error ?? this.#inner.error;
  }

  describe(): string {
    return `${this.#label} over ${this.#inner.describe()}`;
  }

  limitSocketBuffers(bytes: number): boolean {
    return this.#inner.limitSocketBuffers(bytes);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.input.destroy();
    this.output.destroy();
    this.#inner.close();
  }

  #fail(e: ChannelError): void {
    if (this.#error !== undefined) return;
    this.#error = e;
    if (this.listenerCount('error') > 0) this.emit('error', e);
  }
}

async function applyWrapper(ch: Channel, side: ChannelSide, wrap: ChannelWrapper | undefined): Promise<Channel> {
  if (wrap === undefined) return ch;
  try {
    return await wrap(ch, side);
  } catch (e) {
    ch.close();
    throw e;
  }
}

/** The source's channel: connect by URI, then the wrapper (if any). */
export async function openOutgoing(uri: MigrationUri, opts: ConnectOptions & { wrap?: ChannelWrapper }): Promise<Channel> {
  return applyWrapper(await connectOutgoing(uri, opts), 'outgoing', opts.wrap);
}

/** The destination's channel: the listener's connection, then the wrapper (if any). */
export async function acceptIncoming(listener: IncomingListener, wrap?: ChannelWrapper): Promise<Channel> {
  return applyWrapper(await listener.accept(), 'incoming', wrap);
}
