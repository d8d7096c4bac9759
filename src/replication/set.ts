/**
 * Every replicated drive of a VM, driven together (QEMU's
 * replication_start_all / _do_checkpoint_all / _get_error_all / _stop_all):
 * each operation goes over the drives, newest first as QEMU's list keeps
 * them, and stops at the first error.
 */
import type { ReplicationMode, ReplicationNode } from './node.js';

export class ReplicationSet {
  constructor(private readonly nodes: readonly ReplicationNode[]) {}

  get size(): number {
    return this.nodes.length;
  }

  list(): readonly ReplicationNode[] {
    return this.nodes;
  }

  private get order(): ReplicationNode[] {
    return [...this.nodes].reverse();
  }

  async startAll(mode: ReplicationMode): Promise<void> {
    for (const n of this.order) await n.start(mode);
  }

  async checkpointAll(): Promise<void> {
    for (const n of this.order) await n.checkpoint();
  }

  /** null when healthy (or there is nothing to replicate), else QEMU's text of the first error. */
  getErrorAll(): string | null {
    for (const n of this.order) {
      const e = n.getError();
      if (e !== null) return e;
    }
    return null;
  }

  async stopAll(failover: boolean): Promise<void> {
    for (const n of this.order) await n.stop(failover);
  }
}
