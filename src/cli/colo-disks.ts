/**
 * Disks under COLO: the machine's replicated drives (src/replication/,
 * docs/replication.md) driven by the VM's COLO session instead of Xen's
 * commands, at the points where QEMU's migration/colo.c drives its block
 * replication (docs/colo.md, "Disks"):
 *
 *   check       `migrate` with x-colo: a disk workload must write a primary
 *               replicated drive whose replication has not run yet
 *   setup       primary, the first migration begins: mirroring starts
 *               and the whole disk is copied to the secondary's export
 *               (QEMU's recipe: drive-mirror sync=full, then the NBD child
 *               attached, before `migrate`), so the secondary disk is the
 *               primary's from then on, whatever the guest wrote before
 *   start       secondary: replication_start_all, before the standby runs
 *   checkpoint  primary: the guest is stopped; replication_do_checkpoint_all
 *               (nothing to do on a primary) and the mirror is held until
 *               the secondary has its replication checkpoint (Ferry's primary
 *               runs on before the secondary loads; QEMU's waits);
 *               secondary: replication_get_error_all, then
 *               replication_do_checkpoint_all once the checkpoint is
 *               applied: the overlays are emptied
 *   checkpoint-done  primary: the held writes go on
 *   failover    replication_stop_all(failover): the primary stops
 *               mirroring; the secondary, whose guest is put back to the
 *               last checkpoint, drops its own writes since then and
 *               commits the hidden disk (the primary's writes since are
 *               undone): its disk is the checkpoint's
 *   abort       primary, the first migration failed: mirroring stops
 */
import type { Machine } from '../machine/index.js';
import type { ColoReplication } from '../migration/colo/index.js';
import { ReplicationPrimary } from '../replication/index.js';

export function coloDisks(machine: Machine): ColoReplication {
  const set = () => machine.replication;
  const running = () => set().list().some((n) => n.stage === 'running');
  return {
    check: () => {
      for (const n of set().list()) {
        if (n.mode === 'primary' && n.stage !== 'none') {
          return `COLO cannot start block replication on drive '${n.driveName}': it is running or done (a primary replicates once; start a new pair)`;
        }
      }
      for (const w of machine.diskWorkloadInfo()) {
        if (!(machine.drives.get(w.drive)?.image instanceof ReplicationPrimary)) {
          return `COLO cannot replicate the disk workload's drive '${w.drive}': it is not a replicated drive (driver=quorum with a replication child in mode=primary, docs/replication.md)`;
        }
      }
      return null;
    },
    setup: async () => {
      await set().startAll('primary');
      await set().syncSecondaryAll();
    },
    start: async (mode) => {
      if (mode === 'secondary') await set().startAll('secondary');
    },
    checkpoint: async (mode) => {
      if (mode === 'primary') {
        await set().checkpointAll();
        set().holdMirrorAll();
        return;
      }
      const e = set().getErrorAll();
      if (e !== null && set().size > 0) throw new Error(`block replication: ${e}`);
      await set().checkpointAll();
    },
    'checkpoint-done': () => set().releaseMirrorAll(),
    failover: async (mode) => {
      set().releaseMirrorAll();
      if (!running()) return;
      if (mode === 'secondary') await set().revertOwnWritesAll();
      await set().stopAll(true);
    },
    abort: async () => {
      if (running()) await set().stopAll(false);
    },
  };
}
