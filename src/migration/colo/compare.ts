/**
 * The console comparison: Ferry's counterpart of QEMU's colo-compare
 * (docs/colo.md, "Console comparison"). colo-compare sits on the primary's
 * host, receives the network packets of both guests, compares them in
 * order, releases a primary packet once its secondary twin matched, asks
 * for a checkpoint when two differ or when a packet waited longer than
 * compare_timeout, and at every checkpoint releases what the primary still
 * holds and forgets the secondary's. Ferry's guests talk through their
 * serial consoles, so the packets are console lines: the primary taps its
 * own console (Machine.setConsoleTap), the secondary forwards every line it
 * prints over the return path (wire.ts FERRY_CONSOLE) and prints none.
 *
 * Epochs. The n-th line either guest prints after checkpoint k is compared
 * with the other's n-th line after checkpoint k. The secondary stops when
 * it receives a checkpoint request and sends its reply after all its lines
 * (one ordered channel), so when the primary takes its snapshot it has seen
 * every secondary line of the epoch: closeEpoch() then starts the next one.
 * The primary resumes before the secondary has loaded the checkpoint; its
 * lines from then on belong to the next epoch, whose secondary lines come
 * after vmstate-loaded. A line the primary printed before a snapshot is
 * covered by that checkpoint once the secondary has loaded it (loaded()).
 *
 * Modes: `trigger` prints the primary's lines at once and only asks for
 * checkpoints; `full` holds each of them until its twin matched or a loaded
 * checkpoint covers it, in order (a matched line waits behind an older one
 * still held).
 */
import type { ColoCompareMode } from '../../generated/qapi-types.js';

export interface CompareHooks {
  /** Write released primary output to the console. */
  release(text: string): void;
  /** Take a checkpoint as soon as possible. */
  checkpoint(): void;
  now(): number;
}

interface Held {
  text: string;
  /** epoch the line was printed in */
  epoch: number;
  /** may be written (matched, or covered by a loaded checkpoint) */
  ready: boolean;
}

interface Queued {
  text: string;
  at: number;
  held: Held | null;
}

export class ConsoleCompare {
  private mode: ColoCompareMode;
  private timeoutMs: number;
  private epoch = 0;
  /** the last epoch a checkpoint in flight covers (-1: none) */
  private covering = -1;
  /** primary lines held back, oldest first (full mode) */
  private readonly out: Held[] = [];
  /** lines of this epoch not compared yet */
  private pq: Queued[] = [];
  private sq: Queued[] = [];
  /** a checkpoint was asked for in this epoch: compare no more until it is taken */
  private asked = false;
  /** checkpoints asked for, over the session */
  checkpointsAsked = 0;
  /** lines that matched their twin */
  matched = 0;

  constructor(
    mode: ColoCompareMode,
    timeoutMs: number,
    private readonly hooks: CompareHooks,
  ) {
    this.mode = mode;
    this.timeoutMs = timeoutMs;
  }

  /** Primary console lines held back now. */
  get held(): number {
    return this.out.length;
  }

  /** New settings; leaving `full` releases what is held. */
  configure(mode: ColoCompareMode, timeoutMs: number): void {
    this.mode = mode;
    this.timeoutMs = timeoutMs;
    if (mode !== 'full') this.releaseAll();
    if (mode === 'off') {
      this.pq = [];
      this.sq = [];
    }
  }

  /** A line the primary printed; true: it is held back (the tap keeps it from the output). */
  primaryLine(text: string): boolean {
    if (this.mode === 'off') return false;
    const held = this.mode === 'full' ? { text, epoch: this.epoch, ready: false } : null;
    if (held) this.out.push(held);
    if (!this.asked) {
      this.pq.push({ text, at: this.hooks.now(), held });
      this.compare();
    }
    return held !== null;
  }

  /** A line the secondary printed (it came over the return path). */
  secondaryLine(text: string): void {
    if (this.mode === 'off' || this.asked) return;
    this.sq.push({ text, at: this.hooks.now(), held: null });
    this.compare();
  }

  /** Lines of both guests that differ, or one waiting too long: ask for a checkpoint (once per epoch). */
  private ask(): void {
    this.asked = true;
    this.pq = [];
    this.sq = [];
    this.checkpointsAsked++;
    this.hooks.checkpoint();
  }

  private compare(): void {
    while (this.pq.length > 0 && this.sq.length > 0) {
      const p = this.pq.shift()!;
      const s = this.sq.shift()!;
      if (p.text !== s.text) {
        this.ask();
        return;
      }
      this.matched++;
      if (p.held) p.held.ready = true;
    }
    this.drain();
  }

  /** Called often (every 100 ms): a line that waited compare-timeout for its twin asks for a checkpoint. */
  tick(): void {
    if (this.mode === 'off' || this.asked) return;
    const oldest = Math.min(this.pq[0]?.at ?? Infinity, this.sq[0]?.at ?? Infinity);
    if (this.hooks.now() - oldest >= this.timeoutMs) this.ask();
  }

  /** The primary took its snapshot: what it printed so far belongs to that checkpoint. */
  closeEpoch(): void {
    this.covering = this.epoch;
    this.epoch++;
    this.pq = [];
    this.sq = [];
    this.asked = false;
  }

  /** The secondary loaded the checkpoint: every line it covers may go out. */
  loaded(): void {
    for (const h of this.out) if (h.epoch <= this.covering) h.ready = true;
    this.drain();
  }

  /** Everything held goes out (failover on the primary: it runs alone now). */
  releaseAll(): void {
    for (const h of this.out) h.ready = true;
    this.drain();
  }

  private drain(): void {
    let n = 0;
    let text = '';
    while (n < this.out.length && this.out[n]!.ready) text += this.out[n++]!.text;
    if (n === 0) return;
    this.out.splice(0, n);
    this.hooks.release(text);
  }
}
