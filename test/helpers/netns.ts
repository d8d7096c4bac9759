/**
 * Two network namespaces joined by a veth pair, for real network faults
 * (test/reliability/netfault.test.ts). Each side of a migration runs as a
 * `ferry vm` started with `ip netns exec NS ...`; its QMP socket is a path in
 * the shared filesystem, so the test reaches it from the host namespace,
 * while the migration traffic stays on the veth between the two namespaces.
 *
 *   const why = netnsUnavailable();            // a reason to skip, or undefined
 *   const net = await createNetnsPair();
 *   const src = await net.startVm('a', ['-m', '64M']);
 *   await net.linkDown();                      // a partition
 *   await net.destroy();                       // processes, namespaces, veth
 *
 * Everything is removed by destroy(), and by a process 'exit' hook when a
 * test dies before it runs. Faults (tc qdiscs, nft rules) are applied inside
 * the namespaces, so nothing touches the host's own network.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ferryVmArgv, QmpProcess } from '../../src/cli/launch.js';
import { tempDir, track } from './vm.js';

export type NsSide = 'a' | 'b';

let counter = 0;
const alive = new Set<NetnsPair>();
let exitHook = false;

function run(args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8', timeout: 10000 });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}`.trim() };
}

/** Why namespaces cannot be used here (not root, no `ip`, netns refused), or undefined. */
export function netnsUnavailable(): string | undefined {
  if (process.platform !== 'linux') return 'network namespaces need Linux';
  if (process.getuid?.() !== 0) return 'network namespaces need root';
  const probe = `ferry-nfprobe-${process.pid}`;
  const r = run(['ip', 'netns', 'add', probe]);
  if (!r.ok) return `ip netns add failed: ${r.out || 'no ip command'}`;
  run(['ip', 'netns', 'del', probe]);
  return undefined;
}

/** Run a command inside namespace `ns`; throws with its output when it fails. */
export function nsExec(ns: string, args: string[]): string {
  return execFileSync('ip', ['netns', 'exec', ns, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000 });
}

/** Like nsExec, but returns the error text (undefined on success) instead of throwing. */
export function nsTry(ns: string, args: string[]): string | undefined {
  const r = run(['ip', 'netns', 'exec', ns, ...args]);
  return r.ok ? undefined : r.out || `${args.join(' ')} failed`;
}

export class NetnsPair {
  readonly ns: Record<NsSide, string>;
  readonly dev: Record<NsSide, string>;
  readonly addr: Record<NsSide, string> = { a: '10.77.0.1', b: '10.77.0.2' };
  readonly dir = tempDir('ferry-netns-');
  readonly procs: QmpProcess[] = [];
  /** Helper processes (the delay line), killed before the namespaces go. */
  readonly helpers: ChildProcess[] = [];
  #destroyed = false;

  constructor() {
    const id = `${process.pid}${(counter++).toString(36)}`;
    this.ns = { a: `ferry-nf-${id}-a`, b: `ferry-nf-${id}-b` };
    // interface names: at most 15 bytes
    const short = id.slice(-10);
    this.dev = { a: `fa${short}`, b: `fb${short}` };
  }

  /** Create both namespaces, the veth between them, the addresses and lo. */
  setup(): void {
    alive.add(this);
    if (!exitHook) {
      exitHook = true;
      process.on('exit', () => {
        for (const p of alive) p.destroySync();
      });
    }
    const ip = (...a: string[]): void => void execFileSync('ip', a, { stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000 });
    try {
      ip('netns', 'add', this.ns.a);
      ip('netns', 'add', this.ns.b);
      ip('link', 'add', this.dev.a, 'netns', this.ns.a, 'type', 'veth', 'peer', 'name', this.dev.b, 'netns', this.ns.b);
      for (const s of ['a', 'b'] as const) {
        nsExec(this.ns[s], ['ip', 'addr', 'add', `${this.addr[s]}/24`, 'dev', this.dev[s]]);
        nsExec(this.ns[s], ['ip', 'link', 'set', this.dev[s], 'up']);
        nsExec(this.ns[s], ['ip', 'link', 'set', 'lo', 'up']);
      }
    } catch (e) {
      this.destroySync();
      throw e;
    }
  }

  /** Start `ferry vm ARGS` inside the namespace of `side` (its QMP socket in this.dir). */
  async startVm(side: NsSide, args: string[], name = side === 'a' ? 'src' : 'dst'): Promise<QmpProcess> {
    const sock = join(this.dir, `${name}.qmp`);
    const h = track(new QmpProcess('ip', ['netns', 'exec', this.ns[side], process.execPath, ...ferryVmArgv(sock, args)], {
      sock, dir: this.dir, what: `ferry vm (${this.ns[side]})`, commandTimeoutMs: 30000,
    }));
    this.procs.push(h);
    return h.ready();
  }

  /** `ip link set DEV down|up` on side a's end of the veth (the link goes down on both ends). */
  link(state: 'up' | 'down', side: NsSide = 'a'): void {
    nsExec(this.ns[side], ['ip', 'link', 'set', this.dev[side], state]);
  }

  /**
   * `tc qdisc replace dev DEV root SPEC...` on side's end of the veth (its
   * egress). Returns the error text when the kernel or tc lacks the qdisc.
   */
  qdisc(side: NsSide, spec: string[]): string | undefined {
    return nsTry(this.ns[side], ['tc', 'qdisc', 'replace', 'dev', this.dev[side], 'root', ...spec]);
  }

  /**
   * Drop `percent` of the packets side sends to the other side, at random:
   * nft's numgen, or iptables' statistic match. Returns how, or why neither
   * works here ({ skip }).
   */
  dropRandom(side: NsSide, percent: number): { how: string } | { skip: string } {
    const ns = this.ns[side];
    const peer = this.addr[side === 'a' ? 'b' : 'a'];
    const errs: string[] = [];
    const nft = nsTry(ns, ['nft', 'add', 'table', 'inet', 'ferrynf']);
    if (nft === undefined) {
      const e = nsTry(ns, ['nft', 'add', 'chain', 'inet', 'ferrynf', 'out', '{ type filter hook output priority 0 ; }'])
        ?? nsTry(ns, ['nft', 'add', 'rule', 'inet', 'ferrynf', 'out', 'ip', 'daddr', peer, 'numgen', 'random', 'mod', '100', '<', String(percent), 'counter', 'drop']);
      if (e === undefined) return { how: `nft numgen random mod 100 < ${percent} drop` };
      errs.push(`nft: ${e}`);
    } else errs.push(`nft: ${nft}`);
    const ipt = nsTry(ns, ['iptables', '-A', 'OUTPUT', '-d', peer, '-m', 'statistic', '--mode', 'random', '--probability', String(percent / 100), '-j', 'DROP']);
    if (ipt === undefined) return { how: `iptables -m statistic --mode random --probability ${percent / 100} -j DROP` };
    errs.push(`iptables: ${ipt}`);
    return { skip: `no random packet drop here (${errs.join('; ')})` };
  }

  /** Packets dropped so far by dropRandom's rule on side. */
  dropped(side: NsSide): number {
    const ns = this.ns[side];
    const nft = nsTry(ns, ['nft', 'list', 'table', 'inet', 'ferrynf']) === undefined ? nsExec(ns, ['nft', 'list', 'table', 'inet', 'ferrynf']) : '';
    const m = /counter packets (\d+)/.exec(nft);
    if (m) return Number(m[1]);
    const ipt = nsTry(ns, ['iptables', '-L', 'OUTPUT', '-v', '-n', '-x']) === undefined ? nsExec(ns, ['iptables', '-L', 'OUTPUT', '-v', '-n', '-x']) : '';
    const row = ipt.split('\n').find((l) => /statistic/.test(l));
    return row ? Number(row.trim().split(/\s+/)[0]) : 0;
  }

  /**
   * A second link between the namespaces that delays every packet by `ms`
   * each way: TUN devices in both, joined by test/helpers/delayline.py (a
   * userspace delay line, for kernels without tc netem). Returns the
   * addresses on that link, or why it cannot be built here ({ skip }).
   */
  async delayLine(ms: number): Promise<{ a: string; b: string } | { skip: string }> {
    if (!existsSync('/dev/net/tun')) return { skip: 'no /dev/net/tun' };
    if (!run(['python3', '--version']).ok) return { skip: 'no python3 for the delay line' };
    const short = this.dev.a.slice(2);
    const dev = { a: `da${short}`, b: `db${short}` };
    const script = join(dirname(fileURLToPath(import.meta.url)), '../../../test/helpers/delayline.py');
    const child = spawn('python3', [script, this.ns.a, dev.a, this.ns.b, dev.b, String(ms)], { stdio: ['pipe', 'pipe', 'pipe'] });
    this.helpers.push(child);
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const ready = await new Promise<boolean>((resolve) => {
      child.stdout!.on('data', (d: Buffer) => d.toString().includes('ready') && resolve(true));
      child.once('exit', () => resolve(false));
    });
    if (!ready) return { skip: `the delay line did not start: ${err.trim() || 'no output'}` };
    const addr = { a: '10.78.0.1', b: '10.78.0.2' };
    for (const s of ['a', 'b'] as const) {
      nsExec(this.ns[s], ['ip', 'addr', 'add', `${addr[s]}/24`, 'dev', dev[s]]);
      nsExec(this.ns[s], ['ip', 'link', 'set', dev[s], 'mtu', '65000', 'up']);
    }
    return addr;
  }

  /** Kill the processes, delete the namespaces (which removes the veth). */
  async destroy(): Promise<void> {
    await Promise.all(this.procs.map((p) => p.destroy()));
    this.destroySync();
  }

  destroySync(): void {
    for (const p of this.procs) p.kill();
    for (const h of this.helpers) h.kill('SIGKILL');
    if (this.#destroyed) return;
    this.#destroyed = true;
    alive.delete(this);
    for (const s of ['a', 'b'] as const) run(['ip', 'netns', 'del', this.ns[s]]);
  }

  /** The namespaces and interfaces still present (for a leak check). */
  leftovers(): string[] {
    const list = run(['ip', 'netns', 'list']).out;
    return [this.ns.a, this.ns.b].filter((n) => list.split('\n').some((l) => l.split(' ')[0] === n));
  }
}

/** A pair set up and ready. */
export function createNetnsPair(): NetnsPair {
  const p = new NetnsPair();
  p.setup();
  return p;
}
