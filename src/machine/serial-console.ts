/**
 * The serial console: while the guest runs, one heartbeat line per period
 * of virtual time (`heartbeat <n> vclock=<s>s steps=<total>`), written to a
 * file (appended), to stdout, or nowhere. The count and the period travel
 * in the ferry-serial device (device-state.ts), so a migrated guest goes on
 * counting where the source stopped.
 *
 * A tap (setTap) sees every line the guest prints before it is written, and
 * may keep it back (COLO compares the two guests' consoles and releases the
 * primary's output later through write()).
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import type { SerialConfig } from './types.js';

/** How often the console checks whether a heartbeat is due (ms of wall time). */
const TICK_MS = 20;

/** What the console reads from the machine. */
export interface SerialHost {
  isRunning(): boolean;
  vclockNs(): number;
  totalSteps(): number;
  /** A heartbeat line was written. */
  heartbeat(n: number, line: string): void;
}

/** Sees a line the guest prints; returns true to keep it from the output. */
export type ConsoleTap = (line: string) => boolean;

export class SerialConsole {
  private count = 0;
  private tap: ConsoleTap | null = null;
  private periodNs: number;
  private fd: number | null = null;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly cfg: SerialConfig,
    periodNs: number,
    private readonly host: SerialHost,
  ) {
    if (!(periodNs >= 1e6)) throw new Error('heartbeat period must be >= 1 ms');
    this.periodNs = periodNs;
  }

  heartbeatState(): { count: number; periodNs: number } {
    return { count: this.count, periodNs: this.periodNs };
  }

  setHeartbeatState(count: number, periodNs: number): void {
    this.count = count;
    this.periodNs = periodNs;
  }

  /** Opens the output and starts the heartbeat ticks (they do not keep the process alive). */
  open(): void {
    if (this.cfg.kind === 'file') this.fd = openSync(this.cfg.path, 'a');
    this.timer = setInterval(() => this.tick(), TICK_MS);
    this.timer.unref();
  }

  private tick(): void {
    if (!this.host.isRunning()) return;
    const now = this.host.vclockNs();
    if (now < (this.count + 1) * this.periodNs) return;
    // one line per tick; a lagging console catches up on the next ticks
    const n = ++this.count;
    const line = `heartbeat ${n} vclock=${(now / 1e9).toFixed(3)}s steps=${this.host.totalSteps()}\n`;
    if (this.tap === null || !this.tap(line)) this.write(line);
    this.host.heartbeat(n, line);
  }

  /** Every later guest line goes to `tap` first (null: straight to the output again). */
  setTap(tap: ConsoleTap | null): void {
    this.tap = tap;
  }

  /** Writes text to the console output. */
  write(text: string): void {
    if (this.cfg.kind === 'stdout') process.stdout.write(text);
    else if (this.fd !== null) writeSync(this.fd, text);
  }

  /** No more heartbeats. */
  stopHeartbeat(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Closes the output file (later writes go nowhere). */
  closeOutput(): void {
    if (this.fd !== null) {
      closeSync(this.fd);
      this.fd = null;
    }
  }
}
