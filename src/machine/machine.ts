/**
 * The guest that Ferry migrates: RAM blocks in SharedArrayBuffers with an
 * always-on dirty bitmap, vCPU worker threads running a deterministic
 * workload, a virtual clock, a heartbeat serial console, migratable devices
 * and the run state. Knows nothing of migration or QMP.
 *
 * Run state rules (simplified QEMU; every move is checked against the
 * table of run-state.ts, and one it does not allow throws):
 * - initial: `inmigrate` with `incoming`, else `prelaunch`; without
 *   `startPaused` create() starts the guest (prelaunch -> running).
 * - start(): from any state except `running` (no-op) and `shutdown`
 *   (error) to `running`; the vCPUs resume and the virtual clock runs.
 *   (The commands layer decides which states `cont` accepts.)
 * - stop(newState = 'paused'): from `running`: pause all vCPUs (resolves
 *   after every vCPU acknowledged), freeze the clock, enter newState.
 *   From a non-running state: newState 'paused' is a no-op (a stopped VM
 *   stays in prelaunch/inmigrate/postmigrate/...), any other newState is
 *   entered directly (e.g. finish-migrate, postmigrate).
 * - stop('finish-migrate') remembers the state it left in
 *   `savedRunStateForMigration`; globalstate.save() sends it.
 * - Every change emits 'runstate' (newState, oldState).
 * Start/stop calls are serialised.
 *
 * Events: 'runstate' (new, old), 'heartbeat' (n, line),
 * 'vcpu-error' (index, Error) — after which the run state is internal-error.
 */
import { EventEmitter } from 'node:events';
import { closeSync, openSync, writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import {
  ACK_EXITED,
  ACK_PAUSED,
  ACK_RUNNING,
  BLOCK_PAGES,
  CMD_EXIT,
  CMD_PAUSE,
  CMD_RUN,
  CTL_ACK,
  CTL_BLOCKED,
  CTL_CMD,
  CTL_DEMAND,
  CTL_FAULT_COUNT,
  CTL_FAULT_WAITERS,
  CTL_LENGTH,
  CTL_SEQ,
  CTL_THROTTLE,
  FAULT_RING,
  MAX_VCPUS,
  VS_ACTIVE,
  VS_NSLOTS,
  VS_STEPS,
  VS_STEPS_LIMIT,
  VS_STRIDE,
  VS_SUM,
} from './layout.js';
import { decodeWorkload, encodeWorkload, resolveWorkload, validateSlots } from './vcpu-slots.js';
import { GuestRam, checkRamSize, type MemoryDigest } from './ram.js';
import { GlobalStateDevice, SerialDevice, TimerDevice, VcpuDevice, type DeviceHost } from './device-state.js';
import { RunStateMachine } from './run-state.js';
import {
  type FillConfig,
  type MachineConfig,
  type MigratableDevice,
  type RamBlock,
  type RunState,
  type SerialConfig,
  type WorkloadConfig,
} from './types.js';

/** Error thrown by RAM readers (digest, pmemsave) while demand paging is on. */
export const DEMAND_PAGING_RAM_ERROR = 'Guest memory is still being fetched from the migration source';

/** Workload counters of one vCPU (x-query-workload). */
export interface VcpuWorkloadInfo {
  cpuIndex: number;
  /** steps done (exact while paused, sampled after every batch while running) */
  steps: number;
  /** stress read=on checksum (0 otherwise) */
  sum: number;
  /** waiting for a missing page (demand paging) */
  blocked: boolean;
}

type WaitAsyncResult = { async: false; value: 'not-equal' | 'timed-out' } | { async: true; value: Promise<'ok' | 'timed-out'> };
/** Atomics.waitAsync (Node >= 16; not in the ES2023 lib typings). */
const waitAsync = (Atomics as unknown as {
  waitAsync(a: Int32Array, i: number, v: number, t?: number): WaitAsyncResult;
}).waitAsync.bind(Atomics);

function hrNs(): number {
  return Number(process.hrtime.bigint());
}

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
  /** Latency of the last pauseVcpus() in ms (request to every ack). */
  lastPauseLatencyMs = 0;

  private readonly rs: RunStateMachine;
  /** Start the guest once created (neither -S nor -incoming). */
  private readonly autostart: boolean;
  private _workload: WorkloadConfig;
  private readonly ctl: Int32Array;
  private readonly vstate: Float64Array;
  private readonly workers: Worker[] = [];
  private readonly guestRam: GuestRam;
  private clockAccNs = 0;
  private clockRunStart: number | null = null;
  private hbCount = 0;
  private hbPeriodNs: number;
  private hbTimer: NodeJS.Timeout | null = null;
  private serialFd: number | null = null;
  private readonly serial: SerialConfig;
  private opChain: Promise<unknown> = Promise.resolve();
  private vcpuError: Error | null = null;
  private destroyed = false;
  private vcpusRunning = false;
  private readonly faultLat: Float64Array;
  private onFault: ((block: number, page: number) => void) | null = null;

  private constructor(cfg: MachineConfig) {
    super();
    checkRamSize(cfg.ramSize);
    if (!Number.isInteger(cfg.smp) || cfg.smp < 1 || cfg.smp > MAX_VCPUS) {
      throw new Error(`Invalid smp ${cfg.smp}: expected 1..${MAX_VCPUS} vCPUs`);
    }
    this.name = cfg.name ?? 'ferry';
    this.machineType = cfg.machineType ?? 'none';
    this.smp = cfg.smp;
    this.ramSize = cfg.ramSize;
    this.fill = cfg.fill ?? { kind: 'zero' };
    this.serial = cfg.serial ?? { kind: 'none' };
    this.hbPeriodNs = cfg.heartbeatPeriodNs ?? 1e9;
    if (!(this.hbPeriodNs >= 1e6)) throw new Error('heartbeat period must be >= 1 ms');

    this.guestRam = new GuestRam(cfg.ramSize, cfg.memoryBackendId ?? 'pc.ram');
    this.ram = this.guestRam.blocks;

    this.ctl = new Int32Array(new SharedArrayBuffer(CTL_LENGTH * 4));
    this.faultLat = new Float64Array(new SharedArrayBuffer(FAULT_RING * 8));
    this.vstate = new Float64Array(new SharedArrayBuffer(MAX_VCPUS * VS_STRIDE * 8));
    this.ctl[CTL_CMD] = CMD_PAUSE;
    this._workload = { kind: 'idle' };
    this.setWorkload(cfg.workload ?? { kind: 'idle' });

    this.rs = new RunStateMachine(cfg.incoming ? 'inmigrate' : 'prelaunch', (now, old) => this.emit('runstate', now, old));
    this.autostart = !cfg.incoming && !cfg.startPaused;

    const devs: MigratableDevice[] = [new TimerDevice(this), new SerialDevice(this)];
    for (let i = 0; i < this.smp; i++) devs.push(new VcpuDevice(this, i));
    devs.push(new GlobalStateDevice(this));
    this.devices = devs;
  }

  /** Creates the machine: RAM, boot fill, vCPU workers; starts them unless -S/-incoming. */
  static async create(cfg: MachineConfig): Promise<Machine> {
    const m = new Machine(cfg);
    try {
      // an incoming VM's RAM comes from the stream: filling it would be wasted work
      if (m.runState === 'inmigrate') m.guestRam.prefaultInBackground();
      else await m.guestRam.fill(m.fill);
      await m.spawnVcpus();
      m.openSerial();
      if (m.autostart) await m.start();
    } catch (e) {
      await m.destroy();
      throw e;
    }
    return m;
  }

  /* ------------------------------------------------------------ state */

  get runState(): RunState {
    return this.rs.state;
  }

  /** The workload now configured (adopted from the source after a vCPU state load). */
  get workload(): WorkloadConfig {
    return { ...this._workload };
  }

  /** Total RAM pages. */
  get ramPages(): number {
    return this.guestRam.pages;
  }

  /** Virtual clock in ns; advances only while running. */
  vclockNs(): number {
    return this.clockAccNs + (this.clockRunStart !== null ? hrNs() - this.clockRunStart : 0);
  }

  setVclockNs(ns: number): void {
    this.clockAccNs = ns;
    if (this.clockRunStart !== null) this.clockRunStart = hrNs();
  }

  /** Steps (writes) done so far by each vCPU (sampled; exact while paused). */
  vcpuSteps(): number[] {
    const r: number[] = [];
    for (let i = 0; i < this.smp; i++) r.push(this.vstate[i * VS_STRIDE + VS_STEPS]!);
    return r;
  }

  totalSteps(): number {
    return this.vcpuSteps().reduce((a, b) => a + b, 0);
  }

  /** True when every active vCPU has reached its steps=N limit (false without a limit). */
  workloadDone(): boolean {
    for (let i = 0; i < this.smp; i++) {
      const o = i * VS_STRIDE;
      if (this.vstate[o + VS_ACTIVE] !== 1) continue;
      const lim = this.vstate[o + VS_STEPS_LIMIT]!;
      if (lim < 0 || this.vstate[o + VS_STEPS]! < lim) return false;
    }
    return true;
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.opChain.then(fn, fn);
    this.opChain = p.catch(() => undefined);
    return p;
  }

  /** cont: resume vCPUs and clock; → running. */
  start(): Promise<void> {
    return this.serialize(async () => {
      this.checkAlive();
      if (this.runState === 'running') return;
      if (this.runState === 'shutdown') throw new Error('The VM has shut down');
      this.rs.check('running');
      await this.resumeVcpus();
      this.clockRunStart = hrNs();
      this.rs.set('running');
    });
  }

  /** Stop the VM (see the header comment for the rules). */
  stop(newState: RunState = 'paused'): Promise<void> {
    return this.serialize(async () => {
      this.checkAlive();
      if (newState === 'running') throw new Error("stop: new state cannot be 'running'");
      const old = this.runState;
      if (old === 'running') {
        this.rs.check(newState);
        await this.pauseVcpus();
        this.clockAccNs = this.vclockNs();
        this.clockRunStart = null;
        if (newState === 'finish-migrate') this.savedRunStateForMigration = old;
        this.rs.set(newState);
        return;
      }
      if (newState === 'paused') return;
      this.rs.check(newState);
      if (newState === 'finish-migrate' && old !== 'finish-migrate') this.savedRunStateForMigration = old;
      this.rs.set(newState);
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
        await this.pauseVcpus();
        this.clockAccNs = this.vclockNs();
        this.clockRunStart = null;
        if (s === 'finish-migrate') this.savedRunStateForMigration = 'running';
      }
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

  /* ------------------------------------------------------------ vCPUs */

  private checkAlive(): void {
    if (this.destroyed) throw new Error('machine destroyed');
    if (this.vcpuError) throw new Error(`vCPU failed: ${this.vcpuError.message}`);
  }

  private command(cmd: number): void {
    Atomics.store(this.ctl, CTL_CMD, cmd);
    Atomics.add(this.ctl, CTL_SEQ, 1);
    Atomics.notify(this.ctl, CTL_SEQ);
    // a vCPU blocked on a missing page waits on the page's present word
    if (Atomics.load(this.ctl, CTL_FAULT_WAITERS) > 0) this.wakeBlocked();
  }

  /** Wakes every vCPU blocked on a missing page so that it rechecks the command / demand flag. */
  private wakeBlocked(): void {
    for (let i = 0; i < this.smp; i++) {
      const v = Atomics.load(this.ctl, CTL_BLOCKED + i);
      if (v === 0) continue;
      const p = v - 1;
      const blk = this.ram[Math.floor(p / BLOCK_PAGES)];
      if (blk) Atomics.notify(blk.present, (p % BLOCK_PAGES) >>> 5);
    }
  }

  /* ---------------------------------------------------- demand paging */

  /**
   * Turns demand paging on (postcopy destination). The caller has already
   * cleared the `present` bits of the pages still missing (RamBlock.present).
   * From now on a vCPU that is about to touch a missing page blocks before
   * the access and posts one fault: onFault(block, page) is called on the
   * main thread (block index into `ram`, block-local page). A fault may be
   * reported for a page that arrived meanwhile. Resets faultStats().
   */
  beginDemandPaging(onFault: (block: number, page: number) => void): void {
    this.checkAliveForRam();
    // The ring is read only up to the count, so it needs no clearing (and
    // the first touch of its 512 KiB cost up to 12 ms of downtime here).
    Atomics.store(this.ctl, CTL_FAULT_COUNT, 0);
    this.onFault = onFault;
    Atomics.store(this.ctl, CTL_DEMAND, 1);
  }

  /**
   * Marks a page present (after its bytes were written) and wakes a vCPU
   * waiting for it. Cheap: one Atomics.or, plus a notify only while some
   * vCPU is blocked.
   */
  markPresent(block: number, page: number): void {
    const arr = this.ram[block]!.present;
    const wi = page >>> 5;
    Atomics.or(arr, wi, 1 << (page & 31));
    if (Atomics.load(this.ctl, CTL_FAULT_WAITERS) > 0) Atomics.notify(arr, wi);
  }

  /**
   * Ends demand paging: the vCPUs stop checking present bits (a blocked
   * vCPU is released and does its step), onFault is no longer called.
   * Does not change the present bitmaps.
   */
  endDemandPaging(): void {
    Atomics.store(this.ctl, CTL_DEMAND, 0);
    this.onFault = null;
    this.wakeBlocked();
  }

  get demandPaging(): boolean {
    return Atomics.load(this.ctl, CTL_DEMAND) !== 0;
  }

  /**
   * Faults resolved (page arrived) since beginDemandPaging, and their
   * latencies in µs (fault to page present), oldest first: the newest
   * FAULT_RING samples at most.
   */
  faultStats(): { faults: number; latenciesUs: Float64Array } {
    const faults = Atomics.load(this.ctl, CTL_FAULT_COUNT);
    if (faults <= FAULT_RING) return { faults, latenciesUs: this.faultLat.slice(0, faults) };
    const out = new Float64Array(FAULT_RING);
    const head = faults % FAULT_RING;
    out.set(this.faultLat.subarray(head), 0);
    out.set(this.faultLat.subarray(0, head), FAULT_RING - head);
    return { faults, latenciesUs: out };
  }

  /** Per-vCPU workload counters (x-query-workload). */
  workloadInfo(): VcpuWorkloadInfo[] {
    const r: VcpuWorkloadInfo[] = [];
    for (let i = 0; i < this.smp; i++) {
      const o = i * VS_STRIDE;
      r.push({
        cpuIndex: i,
        steps: this.vstate[o + VS_STEPS]!,
        sum: this.vstate[o + VS_SUM]! >>> 0,
        blocked: Atomics.load(this.ctl, CTL_BLOCKED + i) !== 0,
      });
    }
    return r;
  }

  private async waitAcks(want: number, timeoutMs = 10_000): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    for (let i = 0; i < this.smp; i++) {
      for (;;) {
        const cur = Atomics.load(this.ctl, CTL_ACK + i);
        if (cur === want) break;
        if (this.vcpuError) throw new Error(`vCPU failed: ${this.vcpuError.message}`);
        if (cur === ACK_EXITED && want !== ACK_EXITED) throw new Error(`vCPU ${i} has exited`);
        const left = deadline - performance.now();
        if (left <= 0) throw new Error(`vCPU ${i} did not acknowledge within ${timeoutMs} ms`);
        const r = waitAsync(this.ctl, CTL_ACK + i, cur, Math.min(left, 100));
        if (r.async) await r.value;
      }
    }
  }

  /**
   * Pauses every vCPU; resolves once every worker acknowledged that it is
   * paused (its last write is visible and it will not write again until
   * resumeVcpus()). Does not change the run state (see stop()).
   */
  async pauseVcpus(): Promise<void> {
    const t0 = performance.now();
    this.command(CMD_PAUSE);
    await this.waitAcks(ACK_PAUSED);
    this.vcpusRunning = false;
    this.lastPauseLatencyMs = performance.now() - t0;
  }

  /** Resumes every vCPU (each reloads its workload state); resolves when all acknowledged. */
  async resumeVcpus(): Promise<void> {
    this.command(CMD_RUN);
    await this.waitAcks(ACK_RUNNING);
    this.vcpusRunning = true;
  }

  get vcpusPaused(): boolean {
    return !this.vcpusRunning;
  }

  /** CPU throttle 0..99 percent (QEMU's scheme: run 10 ms, sleep 10ms·p/(1−p)). */
  setThrottle(pct: number): void {
    if (!Number.isInteger(pct) || pct < 0 || pct > 99) {
      throw new RangeError(`throttle percentage ${pct} out of range 0..99`);
    }
    Atomics.store(this.ctl, CTL_THROTTLE, pct);
    Atomics.add(this.ctl, CTL_SEQ, 1);
    Atomics.notify(this.ctl, CTL_SEQ);
  }

  getThrottle(): number {
    return Atomics.load(this.ctl, CTL_THROTTLE);
  }

  private async spawnVcpus(): Promise<void> {
    const ramBufs = this.ram.map((b) => b.bytes.buffer as SharedArrayBuffer);
    const dirtyBufs = this.ram.map((b) => b.dirty.buffer as SharedArrayBuffer);
    const presentBufs = this.ram.map((b) => b.present.buffer as SharedArrayBuffer);
    const faultBuf = this.faultLat.buffer as SharedArrayBuffer;
    const url = new URL('./vcpu-worker.js', import.meta.url);
    for (let i = 0; i < this.smp; i++) {
      const w = new Worker(url, {
        workerData: {
          index: i,
          ctlBuf: this.ctl.buffer,
          vstateBuf: this.vstate.buffer,
          ramBufs,
          dirtyBufs,
          presentBufs,
          faultBuf,
        },
        name: `vcpu${i}`,
      });
      w.on('message', (m: unknown) => {
        const f = this.onFault;
        if (f === null || typeof m !== 'object' || m === null) return;
        const msg = m as { type?: unknown; block?: unknown; page?: unknown };
        if (msg.type !== 'fault') return;
        f(msg.block as number, msg.page as number);
      });
      w.on('error', (e) => {
        if (this.destroyed) return;
        this.vcpuError ??= e;
        this.emit('vcpu-error', i, e);
        this.rs.set('internal-error');
      });
      w.on('exit', (code) => {
        if (this.destroyed || code === 0) return;
        const e = new Error(`vCPU ${i} exited with code ${code}`);
        this.vcpuError ??= e;
        this.emit('vcpu-error', i, e);
        this.rs.set('internal-error');
      });
      this.workers.push(w);
    }
    await this.waitAcks(ACK_PAUSED, 30_000);
  }

  /* --------------------------------------------------------- workload */

  /**
   * Sets the workload (only while the vCPUs are paused): resolves defaults,
   * validates against the RAM size, resets steps and PRNG state.
   */
  setWorkload(w: WorkloadConfig): void {
    if (this.vcpusRunning) throw new Error('setWorkload: vCPUs must be paused');
    const resolved = resolveWorkload(w, this.ramSize);
    const slots = encodeWorkload(resolved, this.smp);
    this._workload = resolved;
    for (let i = 0; i < this.smp; i++) this.vstate.set(slots[i]!, i * VS_STRIDE);
  }

  saveVcpu(index: number): Float64Array {
    if (this.vcpusRunning) throw new Error(`ferry-vcpu ${index}: cannot save while the vCPUs run`);
    return this.vstate.slice(index * VS_STRIDE, index * VS_STRIDE + VS_NSLOTS);
  }

  loadVcpu(index: number, s: Float64Array): void {
    if (this.vcpusRunning) throw new Error(`ferry-vcpu ${index}: cannot load while the vCPUs run`);
    validateSlots(index, s, this.smp, this.ramPages);
    this.vstate.set(s, index * VS_STRIDE);
    // adopt the source's workload description (the same in every vCPU's state)
    this._workload = decodeWorkload(s);
  }

  /* ----------------------------------------------------------- serial */

  heartbeatState(): { count: number; periodNs: number } {
    return { count: this.hbCount, periodNs: this.hbPeriodNs };
  }

  setHeartbeatState(count: number, periodNs: number): void {
    this.hbCount = count;
    this.hbPeriodNs = periodNs;
  }

  private openSerial(): void {
    if (this.serial.kind === 'file') this.serialFd = openSync(this.serial.path, 'a');
    this.hbTimer = setInterval(() => this.heartbeatTick(), 20);
    this.hbTimer.unref();
  }

  private heartbeatTick(): void {
    if (this.runState !== 'running') return;
    const now = this.vclockNs();
    if (now < (this.hbCount + 1) * this.hbPeriodNs) return;
    // one line per tick; a lagging console catches up on the next ticks
    const n = ++this.hbCount;
    const line = `heartbeat ${n} vclock=${(now / 1e9).toFixed(3)}s steps=${this.totalSteps()}\n`;
    this.writeSerial(line);
    this.emit('heartbeat', n, line);
  }

  /** Writes text to the serial console output. */
  writeSerial(text: string): void {
    if (this.serial.kind === 'stdout') process.stdout.write(text);
    else if (this.serialFd !== null) writeSync(this.serialFd, text);
  }

  /* ------------------------------------------------------------- RAM */

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
    if (this.demandPaging) throw new Error(DEMAND_PAGING_RAM_ERROR);
  }

  /* --------------------------------------------------------- teardown */

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
    if (this.hbTimer) clearInterval(this.hbTimer);
    this.hbTimer = null;
    this.command(CMD_EXIT);
    this.clockAccNs = this.vclockNs();
    this.clockRunStart = null;
    const exits = this.workers.map(
      (w) =>
        new Promise<void>((resolve) => {
          const t = setTimeout(() => void w.terminate().then(() => resolve(), () => resolve()), 2000);
          w.once('exit', () => {
            clearTimeout(t);
            resolve();
          });
        }),
    );
    await Promise.all(exits);
    await this.guestRam.close();
    if (this.serialFd !== null) {
      closeSync(this.serialFd);
      this.serialFd = null;
    }
  }
}
