/**
 * What a multifd channel's worker (channel-worker.ts) and the main thread
 * (channel.ts) share: the control words, the data the worker starts with,
 * and the messages it sends.
 */

/** Indices into the channel's control words (an Int32Array on a SharedArrayBuffer). */
export const CTL = {
  /** Set by the main thread: stop at the next chance. */
  QUIT: 0,
  /** send: packets queued in the slots by the main thread (a count). */
  HEAD: 1,
  /** send: packets the worker has sent (a count). */
  TAIL: 2,
  /** recv: SYNC packets received. */
  SYNCS: 3,
  /** recv: SYNC packets the main thread has passed (its EOS). */
  RELEASED: 4,
  /** recv: pages received. */
  PAGES: 5,
} as const;

/** Packets a sending channel holds in flight. */
export const SLOT_COUNT = 16;
/** Control words in all: the counters above, then 4 per slot (slotMeta). */
export const CTL_WORDS = 16 + 4 * SLOT_COUNT;

/** Where slot i's metadata (block index, pages) starts in the control words. */
export function slotMeta(i: number): number {
  return 16 + 4 * i;
}

export interface WorkerBlock {
  name: string;
  /** The block's bytes (a view of its SharedArrayBuffer). */
  bytes: Uint8Array;
  /** Its `touched` bitmap (shared too). */
  touched: Uint32Array;
}

export interface ChannelWorkerData {
  role: 'send' | 'recv';
  fd: number;
  /** send: this channel's id (its initial packet carries it). */
  id: number;
  /** recv: multifd-channels here (a larger id is refused). */
  channels: number;
  ctl: SharedArrayBuffer;
  /** send: SLOT_COUNT packet headers. */
  slots: SharedArrayBuffer;
  slotCount: number;
  blocks: WorkerBlock[];
  uuid: Uint8Array;
}

export type WorkerMessage =
  | { kind: 'init'; id: number }
  | { kind: 'error'; message: string }
  /** The peer closed the connection (atPacket: between two packets). */
  | { kind: 'eof'; atPacket: boolean }
  /** The worker stopped because QUIT was set. */
  | { kind: 'end' };
