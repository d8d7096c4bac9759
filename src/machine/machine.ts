/**
 * The guest that Ferry migrates, as one object: `Machine` composes
 *   ram.ts             guest RAM (blocks, bitmaps, fill, digest, pmemsave)
 *   vcpus.ts           the vCPU worker threads, pause/resume, throttle, workload
 *   demand-paging.ts   postcopy's missing pages and the vCPUs blocked on them
 *   serial-console.ts  the heartbeat console
 *   virtual-clock.ts   the guest clock
 *   run-state.ts       the run state and its transition table
 *   device-state.ts    the migratable devices, in section order
 *   drives.ts          the drives (-drive): images, cache modes, dirty-chunk logs
 *   disk-workload.ts   the guest's disk writes (-disk-workload), on the main thread
 *   ram-snapshot.ts    a private copy of RAM that pages can be put back from
 * and keeps the rules that tie them together, below. Knows nothing of
 * migration or QMP.
 *
 * Run state rules (simplified QEMU; every move is checked against the
 * table of run-state.ts, and one it does not allow throws):
 * - initial: `inmigrate` with `incoming`, else `prelaunch`; without
 *   `startPaused` create() starts the guest (prelaunch -> running).
 * - start(): from any state except `running` (no-op) and `shutdown`
 *   (error) to `running`; the vCPUs resume, the virtual clock runs, then
 *   the disk workload resumes.
 *   (The commands layer decides which states `cont` accepts.)
 * - stop(newState = 'paused'): from `running`: pause all vCPUs (resolves
 *   after every vCPU acknowledged) and the disk workload (after its step in
 *   flight), freeze the clock, flush every drive (QEMU's vm_stop does;
 *   a flush error sets the drive's I/O status and emits 'drive-error'),
 *   enter newState.
 *   From a non-running state: newState 'paused' is a no-op (a stopped VM
 *   stays in prelaunch/inmigrate/postmigrate/...), any other newState is
 *   entered directly (e.g. finish-migrate, postmigrate).
 * - stop('finish-migrate') remembers the state it left in
 *   `savedRunStateForMigration`; globalstate.save() sends it.
 * - Every change emits 'runstate' (newState, oldState).
 * Start/stop calls are serialised.
 *
 * Drives are opened first in create() (a DriveError names the -drive that
 * failed) and flushed and closed last in destroy(). An incoming machine's
 * drives, and a source's once it entered postmigrate, are reopened before
 * the guest next leaves that state (start(), setRunState() to anything but
 * internal-error or shutdown): on shared storage the other side wrote them,
 * and nothing cached of their metadata may survive (QEMU inactivates the
 * images there and activates them again).
 *
 * Events: 'runstate' (new, old), 'heartbeat' (n, line),
 * 'vcpu-error' (index, Error) — after which the run state is internal-error,
 * 'disk-workload-error' (Error) — the disk workload stopped; the guest runs on,
 * 'drive-error' (drive name, Error) — a flush or close failed,
 * 'replication-error' (drive name, Error) — block replication failed on a
 * replicated drive (the guest runs on; query-xen-replication-status says so).
 */
import { EventEmitter } from 'node:events';
import { DemandPaging, DEMAND_PAGING_RAM_ERROR } from './demand-paging.js';
import { DiskWorkloadDevice, GlobalStateDevice, SerialDevice, TimerDevice, VcpuDevice, type DeviceHost } from './device-state.js';
import { DiskWorkload, resolveDiskWorkload, type DiskWorkloadInfo } from './disk-workload.js';
import { Drives, type BlockDigest, type DriveInfo } from './drives.js';
import type { ReplicationSet } from '../replication/index.js';
import { GuestRam, checkRamSize, takeDirty, type MemoryDigest } from './ram.js';
import { RamSnapshot } from './ram-snapshot.js';
import { RunStateMachine } from './run-state.js';
import { SerialConsole, type ConsoleTap } from './serial-console.js';
import { VcpuThreads, checkVcpuCount, type VcpuWorkloadInfo } from './vcpus.js';
import { VirtualClock } from './virtual-clock.js';
import type { FillConfig, MachineConfig, MigratableDevice, RamBlock, RunState, WorkloadConfig } from './types.js';

export class Machine extends EventEmitter implements DeviceHost {
  readonly name: string;
  readonly machineType: string;
  readonly smp: number;
  readonly ramSize: number;
  readonly ram: readonly RamBlock[];
  readonly devices: MigratableDevice[];
  readonly fill: FillConfig;

  /** Run state recorded by stop('finish-migrate') (QEMU's global_state_store). */
  savedRunStateForMigration: RunState | undefined;
  /** Run state received in a globalstate section, if one was loaded. */
  loadedGlobalState: RunState | undefined;

  private readonly guestRam: GuestRam;
  private readonly vcpus: VcpuThreads;
  private readonly paging: DemandPaging;
  private readonly serial: SerialConsole;
  private readonly clock = new VirtualClock();
  private readonly rs: RunStateMachine;
  private _drives = Drives.none();
  private disk: DiskWorkload | null = null;
  /** The drives may have been written by another process (incoming, or migrated away): reopen before the guest runs. */
  private drivesStale: boolean;
  /** Start the guest once created (neither -S nor -incoming). */
  private readonly autostart: boolean;
  private opChain: Promise<unknown> = Promise.resolve();
  private destroyed = false;

  private constructor(cfg: MachineConfig) {
    super();
    // in this order, so that the first bad setting is the one reported
    checkRamSize(cfg.ramSize);
    checkVcpuCount(cfg.smp);
    this.name = cfg.name ?? 'ferry';
    this.machineType = cfg.machineType ?? 'none';
    this.smp = cfg.smp;
    this.ramSize = cfg.ramSize;
    this.fill = cfg.fill ?? { kind: 'zero' };
    this.serial = new SerialConsole(cfg.serial ?? { kind: 'none' }, cfg.heartbeatPeriodNs ?? 1e9, {
      isRunning: () => this.runState === 'running',
      vclockNs: () => this.vclockNs(),
      totalSteps: () => this.totalSteps(),
      heartbeat: (n, line) => this.emit('heartbeat', n, line),
    });

    this.guestRam = new GuestRam(cfg.ramSize, cfg.memoryBackendId ?? 'pc.ram');
    this.ram = this.guestRam.blocks;
    this.vcpus = new VcpuThreads(cfg.smp, {
      fault: (block, page) => this.paging.fault(block, page),
      commandPosted: () => this.paging.commandPosted(),
      blocked: (i) => this.paging.blocked(i),
      failed: (i, e) => {
        this.emit('vcpu-error', i, e);
        this.rs.set('internal-error');
      },
    });
    this.paging = new DemandPaging(this.vcpus.ctl, this.ram, cfg.smp);
    this.vcpus.setWorkload(cfg.workload ?? { kind: 'idle' }, cfg.ramSize);

    this.rs = new RunStateMachine(cfg.incoming ? 'inmigrate' : 'prelaunch', (now, old) => this.emit('runstate', now, old));
    this.autostart = !cfg.incoming && !cfg.startPaused;
    this.drivesStale = cfg.incoming === true;

    const devs: MigratableDevice[] = [new TimerDevice(this), new SerialDevice(this)];
    for (let i = 0; i < this.smp; i++) devs.push(new VcpuDevice(this, i));
    devs.push(new DiskWorkloadDevice(this));
    devs.push(new GlobalStateDevice(this));
    this.devices = devs;
  }

  /** Creates the machine: drives, disk workload, RAM, boot fill, vCPU workers; starts them unless -S/-incoming. */
  static async create(cfg: MachineConfig): Promise<Machine> {
    const m = new Machine(cfg);
    try {
      m._drives = await Drives.open(cfg.drives ?? [], (drive, e) => m.emit('replication-error', drive, e));
      if (cfg.diskWorkload !== undefined) {
        const w = cfg.diskWorkload;
        m.disk = new DiskWorkload(resolveDiskWorkload(w, m._drives.get(w.drive), m.driveNames()), m._drives.get(w.drive)!, m.diskHost());
      }
      if (cfg.prealloc) await m.guestRam.prefault();
      // an incoming VM's RAM comes from the stream: filling it would be wasted work
      if (m.runState === 'inmigrate') {
        if (!cfg.prealloc) m.guestRam.prefaultInBackground();
      } else {
        await m.guestRam.fill(m.fill);
      }
      await m.vcpus.spawn(m.ram, m.paging.faultLat);
      m.serial.open();
      if (m.autostart) await m.start();
    } catch (e) {
      await m.destroy();
      throw e;
    }
    return m;
  }

  /* ------------------------------------------------------- run state */

  get runState(): RunState {
    return this.rs.state;
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.opChain.then(fn, fn);
    this.opChain = p.catch(() => undefined);
    return p;
  }

  private checkAlive(): void {
    if (this.destroyed) throw new Error('machine destroyed');
    if (this.vcpus.error) throw new Error(`vCPU failed: ${this.vcpus.error.message}`);
  }

  /** From running: pause the vCPUs and the disk workload, freeze the clock, flush the drives. */
  private async pauseGuest(): Promise<void> {
    await Promise.all([this.vcpus.pause(), this.disk?.pause()]);
    this.clock.freeze();
    for (const f of await this._drives.flushAll()) this.emit('drive-error', f.drive, f.error);
  }

  /** cont: resume vCPUs and clock; → running. */
  start(): Promise<void> {
    return this.serialize(() => this.doStart());
  }

  private async doStart(): Promise<void> {
    this.checkAlive();
    if (this.runState === 'running') return;
    if (this.runState === 'shutdown') throw new Error('The VM has shut down');
    this.rs.check('running');
    await this.freshDrives();
    await this.vcpus.resume();
    this.clock.run();
    this.disk?.resume();
    this.rs.set('running');
  }

  /** Stop the VM (see the header comment for the rules). */
  stop(newState: RunState = 'paused'): Promise<void> {
    return this.serialize(() => this.doStop(newState));
  }

  private async doStop(newState: RunState): Promise<void> {
    this.checkAlive();
    if (newState === 'running') throw new Error("stop: new state cannot be 'running'");
    const old = this.runState;
    if (old === 'running') {
      this.rs.check(newState);
      await this.pauseGuest();
      if (newState === 'finish-migrate') this.savedRunStateForMigration = old;
      if (newState === 'postmigrate') this.drivesStale = true;
      this.rs.set(newState);
      return;
    }
    if (newState === 'paused') return;
    this.rs.check(newState);
    if (newState === 'finish-migrate' && old !== 'finish-migrate') this.savedRunStateForMigration = old;
    if (newState === 'postmigrate') this.drivesStale = true;
    this.rs.set(newState);
  }

  /**
   * Runs `fn` with the guest stopped (QEMU's vm_stop_force_state): a running
   * guest is stopped into `state` first (vCPUs and disk workload paused,
   * clock frozen, drives flushed), a stopped one stays as it is. Start,
   * stop and run state changes asked for meanwhile wait until `fn` is done,
   * so nothing restarts the guest under it. Afterwards the guest enters the
   * run state `fn` returned (running: it starts), or the one it had before,
   * also when `fn` throws. `fn` gets the run state the guest had.
   */
  runStopped(state: RunState, fn: (before: RunState) => Promise<RunState | void>): Promise<void> {
    return this.serialize(async () => {
      this.checkAlive();
      const before = this.runState;
      if (before === 'running') await this.doStop(state);
      let after: RunState | void = undefined;
      try {
        after = await fn(before);
      } finally {
        const target = after ?? before;
        if (!this.destroyed) {
          if (target === 'running') await this.doStart();
          else this.rs.set(target);
        }
      }
    });
  }

  /**
   * Enter any run state: 'running' = start(); from running, stop(s);
   * otherwise the state is set directly (e.g. an incoming VM whose
   * globalstate said 'paused': inmigrate -> paused).
   */
  setRunState(s: RunState): Promise<void> {
    if (s === 'running') return this.start();
    return this.serialize(async () => {
      this.checkAlive();
      this.rs.check(s);
      if (this.runState === 'running') {
        await this.pauseGuest();
        if (s === 'finish-migrate') this.savedRunStateForMigration = 'running';
      }
      if (s === 'postmigrate') this.drivesStale = true;
      else if (s !== 'internal-error' && s !== 'shutdown' && s !== 'inmigrate') await this.freshDrives();
      this.rs.set(s);
    });
  }

  globalStateToSave(): string {
    const s = this.savedRunStateForMigration;
    if (s !== undefined) return s;
    return this.runState === 'finish-migrate' ? 'running' : this.runState;
  }

  setLoadedGlobalState(s: RunState): void {
    this.loadedGlobalState = s;
  }

  /* ----------------------------------------------------------- clock */

  /** Virtual clock in ns; advances only while running. */
  vclockNs(): number {
    return this.clock.now();
  }

  setVclockNs(ns: number): void {
    this.clock.set(ns);
  }

  /* ----------------------------------------------------------- vCPUs */

  /**
   * Pauses every vCPU; resolves once every worker acknowledged that it is
   * paused. Does not change the run state and leaves the disk workload and
   * the drives alone (stop() pauses everything).
   */
  pauseVcpus(): Promise<void> {
    return this.vcpus.pause();
  }

  /** Resumes every vCPU; resolves when all acknowledged. Does not change the run state (see start()). */
  resumeVcpus(): Promise<void> {
    return this.vcpus.resume();
  }

  get vcpusPaused(): boolean {
    return this.vcpus.paused;
  }

  /** Latency of the last pause of the vCPUs in ms (request to every ack). */
  get lastPauseLatencyMs(): number {
    return this.vcpus.lastPauseLatencyMs;
  }

  /** CPU throttle 0..99 percent (QEMU's scheme: run 10 ms, sleep 10ms·p/(1−p)). */
  setThrottle(pct: number): void {
    this.vcpus.setThrottle(pct);
  }

  getThrottle(): number {
    return this.vcpus.getThrottle();
  }

  /** The workload now configured (adopted from the source after a vCPU state load). */
  get workload(): WorkloadConfig {
    return this.vcpus.workload;
  }

  /**
   * Sets the workload (only while the vCPUs are paused): resolves defaults,
   * validates against the RAM size, resets steps and PRNG state.
   */
  setWorkload(w: WorkloadConfig): void {
    this.vcpus.setWorkload(w, this.ramSize);
  }

  saveVcpu(index: number): Float64Array {
    return this.vcpus.saveSlots(index);
  }

  loadVcpu(index: number, s: Float64Array): void {
    this.vcpus.loadSlots(index, s, this.ramPages);
  }

  /** Steps (writes) done so far by each vCPU (sampled; exact while paused). */
  vcpuSteps(): number[] {
    return this.vcpus.steps();
  }

  totalSteps(): number {
    return this.vcpuSteps().reduce((a, b) => a + b, 0);
  }

  /** True when every active vCPU has reached its steps=N limit (false without a limit). */
  workloadDone(): boolean {
    return this.vcpus.workloadDone();
  }

  /** Per-vCPU workload counters (x-query-workload). */
  workloadInfo(): VcpuWorkloadInfo[] {
    return this.vcpus.workloadInfo();
  }

  /* ---------------------------------------------------------- drives */

  private async freshDrives(): Promise<void> {
    if (!this.drivesStale) return;
    await this._drives.reopenAll();
    this.drivesStale = false;
  }

  /** The drives, in command-line order (block migration: dirty-chunk logs, reads and writes). */
  get drives(): Drives {
    return this._drives;
  }

  private driveNames(): string[] {
    return this._drives.list.map((d) => d.name);
  }

  /** The replicated drives, driven together (xen-set-replication, xen-colo-do-checkpoint, COLO). */
  get replication(): ReplicationSet {
    return this._drives.replication;
  }

  /** The primary's NBD connection to secondary disk `drive`'s export was lost (replication notes the peer is gone). */
  replicationPeerLost(drive: string, detail: string): void {
    this._drives.replicationPeerLost(drive, detail);
  }

  /** query-block's facts of every drive. */
  blockInfo(): Promise<DriveInfo[]> {
    this.checkAliveForRam();
    return this._drives.info();
  }

  /** sha256 of every drive's guest-visible content (stable while the guest is stopped). */
  blockDigest(): Promise<BlockDigest> {
    this.checkAliveForRam();
    return this._drives.digest();
  }

  /** The disk workload's counters ([] without one). */
  diskWorkloadInfo(): DiskWorkloadInfo[] {
    return this.disk === null ? [] : [this.disk.info()];
  }

  hasDiskWorkload(): boolean {
    return this.disk !== null;
  }

  saveDiskWorkload(): Uint8Array {
    if (this.disk === null) throw new Error('ferry-disk-workload: the machine has no disk workload');
    return this.disk.save();
  }

  /** Adopts the source's disk workload (only while the guest is stopped). */
  loadDiskWorkload(data: Uint8Array): void {
    if (this.runState === 'running') throw new Error('ferry-disk-workload: cannot load while the guest runs');
    this.disk = DiskWorkload.load(data, (n) => this._drives.get(n), this.driveNames(), this.diskHost());
  }

  private diskHost() {
    return {
      vclockNs: () => this.vclockNs(),
      failed: (e: Error) => this.emit('disk-workload-error', e),
    };
  }

  /* --------------------------------------------------- demand paging */

  /** Turns demand paging on (postcopy destination); see DemandPaging.begin(). */
  beginDemandPaging(onFault: (block: number, page: number) => void): void {
    this.checkAliveForRam();
    this.paging.begin(onFault);
  }

  /** Marks a page present (after its bytes were written) and wakes a vCPU waiting for it. */
  markPresent(block: number, page: number): void {
    this.paging.markPresent(block, page);
  }

  /** Ends demand paging; a blocked vCPU is released (the present bitmaps stay as they are). */
  endDemandPaging(): void {
    this.paging.end();
  }

  get demandPaging(): boolean {
    return this.paging.active;
  }

  /** Faults resolved since beginDemandPaging and their latencies in µs, oldest first. */
  faultStats(): { faults: number; latenciesUs: Float64Array } {
    return this.paging.stats();
  }

  /* ---------------------------------------------------------- serial */

  heartbeatState(): { count: number; periodNs: number } {
    return this.serial.heartbeatState();
  }

  setHeartbeatState(count: number, periodNs: number): void {
    this.serial.setHeartbeatState(count, periodNs);
  }

  /** Writes text to the serial console output. */
  writeSerial(text: string): void {
    this.serial.write(text);
  }

  /** Every later line the guest prints goes to `tap` first, which may keep it from the output (null: no tap). */
  setConsoleTap(tap: ConsoleTap | null): void {
    this.serial.setTap(tap);
  }

  /* ------------------------------------------------------------- RAM */

  /** Total RAM pages. */
  get ramPages(): number {
    return this.guestRam.pages;
  }

  /** The incoming migration has loaded: the background prefault ends (ram.ts). */
  endBackgroundPrefault(): void {
    this.guestRam.endBackgroundPrefault();
  }

  /** Block and offset of a guest-physical address. */
  locate(addr: number): { block: RamBlock; offset: number } {
    return this.guestRam.locate(addr);
  }

  /** sha256 of every block in 64 MiB chunks hashed in parallel by helper workers. */
  async digest(): Promise<MemoryDigest> {
    this.checkRamReadable();
    return this.guestRam.digest();
  }

  /** Writes guest-physical [addr, addr+size) to filename (blocks back to back from 0). */
  async pmemsave(addr: number, size: number, filename: string): Promise<void> {
    this.checkRamReadable();
    return this.guestRam.pmemsave(addr, size, filename);
  }

  /** A copy of all of guest RAM (consistent while the vCPUs are stopped); see ram-snapshot.ts. */
  snapshotRam(): RamSnapshot {
    this.checkRamReadable();
    return RamSnapshot.take(this.ram);
  }

  /** Takes and clears the dirty log, ORing it into `into` (one bitmap per block); returns the pages taken. */
  takeDirtyPages(into: readonly Uint32Array[]): number {
    let n = 0;
    this.ram.forEach((b, i) => (n += takeDirty(b, into[i]!)));
    return n;
  }

  /** Puts the pages set in `pages` back from `snapshot` (only while the vCPUs are paused); returns how many. */
  restoreRamPages(snapshot: RamSnapshot, pages: readonly Uint32Array[]): number {
    this.checkAliveForRam();
    if (!this.vcpus.paused) throw new Error('RAM pages can be restored only while the vCPUs are paused');
    return snapshot.restore(this.ram, pages);
  }

  /** Reads guest-physical memory (a copy). */
  read(addr: number, size: number): Uint8Array {
    return this.guestRam.read(addr, size);
  }

  private checkAliveForRam(): void {
    if (this.destroyed) throw new Error('machine destroyed');
  }

  /** RAM readers must not read the holes of pages not fetched yet. */
  private checkRamReadable(): void {
    this.checkAliveForRam();
    if (this.paging.active) throw new Error(DEMAND_PAGING_RAM_ERROR);
  }

  /* -------------------------------------------------------- teardown */

  /** quit: run state shutdown, then destroy(). */
  async quit(): Promise<void> {
    if (this.destroyed) return;
    if (this.runState === 'running') {
      try {
        await this.stop('shutdown');
      } catch {
        /* destroy anyway */
      }
    } else this.rs.set('shutdown');
    await this.destroy();
  }

  /** Terminates the vCPU and helper workers and closes the serial output. Idempotent. */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    this.serial.stopHeartbeat();
    const exited = this.vcpus.exit();
    const diskPaused = this.disk?.pause();
    this.clock.freeze();
    await exited;
    await diskPaused;
    await this.guestRam.close();
    this.serial.closeOutput();
    for (const f of await this._drives.closeAll()) this.emit('drive-error', f.drive, f.error);
  }
}
