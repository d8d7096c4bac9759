/**
 * The source's end of the return path (docs/spec/stream-format.md §12): it
 * reads the destination's messages from the channel's input. PONGs are
 * noted, SHUT is the destination's verdict, page requests (postcopy) go to
 * the sink the RAM section installs, which checks and queues them.
 *
 * It runs on after SHUT: later messages are still read and dispatched,
 * and the end of the input after a SHUT is a normal end. Before a SHUT, a
 * malformed message or the end of the input fails the migration through
 * `onError`. With `stopAtShut` (COLO) it reads nothing after the SHUT: the
 * COLO messages that follow on the same input are COLO's (takeReader()).
 */
import type { Channel } from '../channel/channel.js';
import { ChannelError } from '../channel/errors.js';
import { InternalError, MigrationFailure, PeerError, errorMessage } from '../errors.js';
import { StreamReader } from '../stream/reader.js';
import { MigrationStreamError } from '../wire/errors.js';
import { readRpMessage, type RpMessage } from '../wire/records.js';

/** Where page requests go (the RAM section in postcopy). */
export interface PageRequestSink {
  /**
   * One REQ_PAGES_ID (`blockName` given) or REQ_PAGES (`blockName` null:
   * the block of the last REQ_PAGES_ID). Throws a MigrationStreamError with
   * QEMU's text for a request it must refuse.
   */
  request(blockName: string | null, start: number, length: number): void;
}

export class ReturnPathReader {
  readonly #reader: StreamReader;
  #shut: number | null = null;
  /** PONG 3 had not arrived when a failing SHUT came. */
  #shutBeforeRun = false;
  #sink: PageRequestSink | null = null;
  #shutWaiters: Array<{ resolve(v: number): void; reject(e: Error): void }> = [];
  #error: MigrationFailure | null = null;
  #stopped = false;
  readonly #ended: Promise<void>;
  readonly pongs: number[] = [];

  readonly #stopAtShut: boolean;

  constructor(
    ch: Channel,
    private readonly onError: (e: MigrationFailure) => void,
    opts: { stopAtShut?: boolean } = {},
  ) {
    this.#stopAtShut = opts.stopAtShut ?? false;
    this.#reader = new StreamReader(ch.input);
    this.#ended = this.#loop();
  }

  /** The input after the SHUT (stopAtShut), with whatever is already buffered: its next reader's. */
  takeReader(): StreamReader {
    return this.#reader;
  }

  /** Page requests go here from now on (null: a request fails the migration). */
  setPageRequestSink(sink: PageRequestSink | null): void {
    this.#sink = sink;
  }

  get shutValue(): number | null {
    return this.#shut;
  }

  ponged(v: number): boolean {
    return this.pongs.includes(v);
  }

  /**
   * The destination said it failed (SHUT non-zero) before it answered PING 3,
   * which it does just before POSTCOPY_RUN: its guest never ran.
   */
  failedBeforeRun(): boolean {
    return this.#shutBeforeRun;
  }

  /** Resolves when the reader has stopped (input ended, error, stop()) or after `ms`. */
  async settle(ms: number): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    await Promise.race([this.#ended, new Promise<void>((r) => (t = setTimeout(r, ms)))]);
    clearTimeout(t);
  }

  /** The SHUT value; rejects if the return path failed before one came. */
  waitForShut(): Promise<number> {
    if (this.#shut !== null) return Promise.resolve(this.#shut);
    if (this.#error) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => this.#shutWaiters.push({ resolve, reject }));
  }

  /** Stop reading (pauses the input; does not close the channel). */
  stop(): void {
    this.#stopped = true;
    this.#reader.detach();
  }

  #dispatch(m: RpMessage): void {
    switch (m.type) {
      case 'PONG':
        this.pongs.push(m.value);
        return;
      case 'SHUT': {
        if (this.#shut !== null) return; // the first verdict counts
        this.#shut = m.value;
        for (const w of this.#shutWaiters.splice(0)) w.resolve(m.value);
        if (m.value !== 0) {
          this.#shutBeforeRun = !this.pongs.includes(3);
          // stop sending at once: the destination gave up
          this.onError(new PeerError(`Destination reported failure (SHUT ${m.value})`));
        }
        return;
      }
      default:
        if (this.#sink === null) throw new MigrationStreamError(`Unexpected return path message ${m.type} in precopy`);
        this.#sink.request(m.type === 'REQ_PAGES_ID' ? m.blockName : null, m.start, m.length);
    }
  }

  async #loop(): Promise<void> {
    try {
      for (;;) {
        if (this.#shut !== null && (this.#stopAtShut || this.#reader.atEnd)) return; // the normal end after SHUT
        this.#dispatch(await readRpMessage(this.#reader));
      }
    } catch (e) {
      if (this.#stopped || this.#shut !== null) return; // the verdict is in: what follows does not matter
      const err = ioFailure(e);
      this.#error = err;
      for (const w of this.#shutWaiters.splice(0)) w.reject(err);
      this.onError(err);
    }
  }
}

/** QEMU's "Detected IO failure for postcopy" around whatever stopped the reader, of the same kind. */
function ioFailure(e: unknown): MigrationFailure {
  const msg = `Detected IO failure for postcopy. Migration fails: ${errorMessage(e)}`;
  if (e instanceof MigrationStreamError) return new MigrationStreamError(msg, { cause: e });
  if (e instanceof ChannelError) return new ChannelError(msg, e.code, { cause: e });
  if (e instanceof MigrationFailure && e.kind !== 'internal') return new MigrationStreamError(msg, { cause: e });
  return new InternalError(msg, { cause: e });
}
