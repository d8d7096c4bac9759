/**
 * The destination's end of the return path (docs/spec/stream-format.md §12):
 * PONG for every PING, SHUT with the verdict, and postcopy page requests
 * (REQ_PAGES_ID when the block changes, REQ_PAGES after). It writes to the
 * channel's output once the source opened the path (OPEN_RETURN_PATH);
 * before that, and after the channel went away, messages are dropped.
 */
import type { Channel } from '../channel/channel.js';
import { encodeRpPong, encodeRpReqPages, encodeRpReqPagesId, encodeRpShut } from '../wire/records.js';

export class ReturnPathWriter {
  #open = false;
  #channel: Channel | null = null;
  /** Block of the last REQ_PAGES_ID sent (REQ_PAGES refers to it). */
  #reqBlock = -1;
  /** Page requests sent. */
  requests = 0;

  /** The channel the path runs on (set when the connection is accepted). */
  attach(ch: Channel): void {
    this.#channel = ch;
  }

  /** OPEN_RETURN_PATH arrived. */
  open(): void {
    this.#open = true;
  }

  get isOpen(): boolean {
    return this.#open;
  }

  pong(value: number): void {
    this.#send(encodeRpPong(value));
  }

  shut(value: number): void {
    this.#send(encodeRpShut(value));
  }

  /** Ask for `length` bytes at `start` of block `block` (named `name`). */
  requestPages(block: number, name: string, start: number, length: number): void {
    if (block === this.#reqBlock) {
      this.#send(encodeRpReqPages(start, length));
    } else {
      this.#reqBlock = block;
      this.#send(encodeRpReqPagesId(start, length, name));
    }
    this.requests++;
  }

  #send(msg: Buffer): void {
    const out = this.#channel?.output;
    if (!this.#open || !out || out.destroyed || out.writableEnded) return;
    out.write(msg, () => undefined);
  }
}
