/** The guest's virtual clock: nanoseconds that advance only while the guest runs. */

function hrNs(): number {
  return Number(process.hrtime.bigint());
}

export class VirtualClock {
  /** ns accumulated up to the last stop (or set) */
  private accNs = 0;
  /** hrtime of the last start, while running */
  private runStart: number | null = null;

  now(): number {
    return this.accNs + (this.runStart !== null ? hrNs() - this.runStart : 0);
  }

  /** Sets the clock (e.g. from a migration's timer device); it keeps running if it ran. */
  set(ns: number): void {
    this.accNs = ns;
    if (this.runStart !== null) this.runStart = hrNs();
  }

  run(): void {
    this.runStart = hrNs();
  }

  freeze(): void {
    this.accNs = this.now();
    this.runStart = null;
  }
}
