/**
 * The source's multifd channels (docs/spec/multifd.md): QEMU's `multifd`
 * capability. After the main channel is up, `multifd-channels` more
 * connections go to the same address, each starting with its initial
 * packet. The RAM section (ram/sender.ts sendPagesMultifd) fills packets of
 * up to 128 pages of one block and hands them here; each goes to the next
 * channel with room, round robin, and that channel's worker sends the
 * header and then the pages straight from guest RAM. Zero pages stay on the
 * main stream as ZERO records, as in QEMU 7.2.
 *
 * Before every RAM EOS the section calls sync(): the packet being filled
 * goes out, then a SYNC packet on every channel, after what that channel
 * already carries. The destination reads past a channel's SYNC only once its
 * main stream has passed that EOS, so a page sent again in a later section
 * always lands after its older copy.
 */
import type { Socket } from 'node:net';
import { TARGET_PAGE_SIZE, type RamBlock } from '../../machine/types.js';
import { MigrationError } from '../errors.js';
import { MultifdChannel } from './channel.js';
import type { MultifdWorkers } from './workers.js';
import { HEADER_SIZE, MULTIFD_FLAG_SYNC, PACKET_PAGES, putHeader } from './wire.js';

/** How long one wait for a channel to make progress lasts before the sender looks again. */
const WAIT_MS = 200;

export class MultifdSender {
  readonly channels: MultifdChannel[];
  /** The packet being filled: its header, with the offsets the walk wrote. */
  readonly packet = new Uint8Array(HEADER_SIZE);
  /** Pages in the packet being filled, and their block. */
  packetPages = 0;
  packetBlock = -1;
  /** Packets numbered across all channels, from 0 (QEMU's packet_num). */
  private packetNum = 0;
  /** SYNC packets each channel still owes (queued when it had no room). */
  private readonly owed: number[];
  private next = 0;
  /** Bytes of every packet queued (QEMU's multifd-bytes). */
  bytes = 0;
  private failure: Error | null = null;
  private pumping = false;
  private readonly syncHeader = new Uint8Array(HEADER_SIZE);

  constructor(
    sockets: readonly Socket[],
    private readonly blocks: readonly RamBlock[],
    uuid: Uint8Array,
    pool: MultifdWorkers,
    private readonly onFailure: (e: Error) => void,
  ) {
    const workers = pool.take(sockets.length);
    this.channels = sockets.map((s, id) => new MultifdChannel('send', s, id, pool, workers[id]!, {
      channels: sockets.length,
      blocks: blocks.map((b) => ({ name: b.name, bytes: b.bytes, touched: b.touched })),
      uuid,
      events: { problem: (m) => this.fail(new MigrationError(m)) },
    }));
    this.owed = sockets.map(() => 0);
  }

  private fail(e: Error): void {
    if (this.failure !== null) return;
    this.failure = e;
    this.onFailure(e);
  }

  /** Throws the failure of a channel, if one failed. */
  check(): void {
    if (this.failure !== null) throw this.failure;
  }

  /** A channel that can take the packet now (none owes a SYNC first), or null. */
  private roomy(): MultifdChannel | null {
    const n = this.channels.length;
    for (let k = 0; k < n; k++) {
      const i = (this.next + k) % n;
      const ch = this.channels[i]!;
      if (this.owed[i] === 0 && ch.hasRoom) {
        this.next = (i + 1) % n;
        return ch;
      }
    }
    return null;
  }

  /** Whether the packet being filled must go before another page can join it (full, or another block). */
  mustDispatch(block: number): boolean {
    return this.packetPages === PACKET_PAGES || (this.packetPages > 0 && this.packetBlock !== block);
  }

  /** Start filling for block `block` (the packet is empty or already of that block). */
  fillFor(block: number): void {
    this.packetBlock = block;
  }

  /**
   * Hand the packet being filled to a channel. Returns the bytes it adds to
   * the migration (header and pages), or -1 when no channel has room (the
   * packet stays; wait with room()).
   */
  dispatch(): number {
    if (this.packetPages === 0) return 0;
    const ch = this.roomy();
    if (ch === null) return -1;
    const block = this.blocks[this.packetBlock]!;
    putHeader(this.packet, 0, this.packetPages, this.packetNum++, block.name);
    ch.queue(this.packet, this.packetBlock, this.packetPages);
    const n = HEADER_SIZE + this.packetPages * TARGET_PAGE_SIZE;
    this.bytes += n;
    this.packetPages = 0;
    return n;
  }

  /** Bytes handed to the channels and not sent yet, the packet being filled included: they are still to go. */
  get bytesPending(): number {
    let n = this.packetPages * TARGET_PAGE_SIZE;
    for (const c of this.channels) n += c.bytesInFlight;
    return n;
  }

  /** Waits until some channel has sent a packet (or a while passed). */
  async room(): Promise<void> {
    this.check();
    await Promise.race(this.channels.map((c) => c.sentMore(WAIT_MS)));
    this.pump();
    this.check();
  }

  /**
   * The end of a RAM section's share of the channels: the packet being
   * filled (waiting for room if need be), then a SYNC packet on every
   * channel. Returns the bytes this adds. The SYNC packets of channels
   * without room go as soon as they have some.
   */
  async sync(): Promise<number> {
    let n = 0;
    for (;;) {
      const d = this.dispatch();
      if (d >= 0) {
        n += d;
        break;
      }
      await this.room();
    }
    return n + this.syncNow();
  }

  /** sync() when nothing is being filled (postcopy: no page goes on the channels); never waits. */
  syncNow(): number {
    if (this.packetPages > 0) throw new Error('multifd: a packet is being filled');
    for (let i = 0; i < this.channels.length; i++) this.owed[i]!++;
    this.pump();
    if (this.owed.some((o) => o > 0)) void this.pumpUntilPaid();
    this.bytes += HEADER_SIZE * this.channels.length;
    return HEADER_SIZE * this.channels.length;
  }

  /** Queue the SYNC packets channels owe, as far as they have room. */
  private pump(): void {
    for (let i = 0; i < this.channels.length; i++) {
      const ch = this.channels[i]!;
      while (this.owed[i]! > 0 && ch.hasRoom) {
        putHeader(this.syncHeader, MULTIFD_FLAG_SYNC, 0, this.packetNum++, '');
        ch.queue(this.syncHeader, 0, 0);
        this.owed[i]!--;
      }
    }
  }

  private async pumpUntilPaid(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.failure === null && this.owed.some((o) => o > 0)) await this.room();
    } catch {
      /* reported through onFailure */
    } finally {
      this.pumping = false;
    }
  }

  /** Waits until every channel has sent everything queued (the migration's last bytes). */
  async drain(): Promise<void> {
    for (;;) {
      this.check();
      this.pump();
      const busy = this.channels.filter((c, i) => c.inFlight > 0 || this.owed[i]! > 0);
      if (busy.length === 0) return;
      await Promise.race(busy.map((c) => c.sentMore(WAIT_MS)));
    }
  }

  /** Stops the workers and closes the sockets (after drain() when the migration completed). */
  async close(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.close()));
  }
}
