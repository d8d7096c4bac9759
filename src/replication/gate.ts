/**
 * A read/write gate for async work: any number of shared holders (guest
 * requests, mirrored writes arriving over NBD) or one exclusive holder (a
 * checkpoint, a stop, a failover), first come first served: an exclusive
 * request waits for the shared holders before it and holds back the ones
 * after it.
 */
export class Gate {
  private shared = 0;
  private exclusive = false;
  private readonly queue: { exclusive: boolean; go: () => void }[] = [];

  async withShared<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.release(false);
    }
  }

  async withExclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.release(true);
    }
  }

  private acquire(exclusive: boolean): Promise<void> {
    if (this.queue.length === 0 && !this.exclusive && (!exclusive || this.shared === 0)) {
      if (exclusive) this.exclusive = true;
      else this.shared++;
      return Promise.resolve();
    }
    return new Promise((go) => this.queue.push({ exclusive, go }));
  }

  private release(exclusive: boolean): void {
    if (exclusive) this.exclusive = false;
    else this.shared--;
    while (this.queue.length > 0 && !this.exclusive) {
      const next = this.queue[0]!;
      if (next.exclusive && this.shared > 0) break;
      this.queue.shift();
      if (next.exclusive) this.exclusive = true;
      else this.shared++;
      next.go();
    }
  }
}
