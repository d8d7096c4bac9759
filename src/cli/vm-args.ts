/**
 * Command line of `ferry vm`, modelled on qemu-system: single-dash options,
 * each taking at most one argument, with QEMU's "key=value,key=value" option
 * strings where QEMU has them.
 */

export interface ObjectSpec {
  qomType: string;
  id: string;
  props: Record<string, string>;
}

export interface VmArgs {
  ramSize: string;
  smp: number;
  name?: string;
  machineType: string;
  memoryBackend?: string;
  /** -machine ...,x-qemu-compat=on: send only the device sections QEMU knows (timer, globalstate) */
  qemuCompat: boolean;
  qmp: string[];
  incoming?: string;
  startPaused: boolean;
  /** -mem-prealloc */
  memPrealloc: boolean;
  objects: ObjectSpec[];
  workload: string;
  fill: string;
  serial: string;
}

export class UsageError extends Error {}

/** Options that take an argument; the value is the canonical name. */
const WITH_ARG = new Map<string, string>([
  ['m', 'm'], ['smp', 'smp'], ['name', 'name'], ['qmp', 'qmp'], ['incoming', 'incoming'],
  ['object', 'object'], ['machine', 'machine'], ['M', 'machine'], ['workload', 'workload'],
  ['fill', 'fill'], ['serial', 'serial'], ['display', 'display'], ['accel', 'accel'],
  ['vga', 'vga'], ['monitor', 'monitor'],
]);
const FLAGS = new Set(['S', 'mem-prealloc', 'nodefaults', 'no-user-config', 'no-shutdown', 'enable-kvm']);

/**
 * Split a QEMU option string: "a,b=c,d=e,,f" → first implied value and
 * key/value pairs (",," escapes a comma).
 */
export function parseOptString(s: string, impliedKey?: string): Record<string, string> {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === ',') {
      if (s[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
    } else cur += s[i];
  }
  parts.push(cur);
  const out: Record<string, string> = {};
  parts.forEach((p, idx) => {
    if (p === '') return;
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (idx === 0 && impliedKey) out[impliedKey] = p;
      else out[p] = 'on';
    } else {
      out[p.slice(0, eq)] = p.slice(eq + 1);
    }
  });
  return out;
}

export function parseVmArgs(argv: readonly string[]): VmArgs {
  const a: VmArgs = {
    ramSize: '128M',
    smp: 1,
    machineType: 'none',
    qemuCompat: false,
    qmp: [],
    startPaused: false,
    memPrealloc: false,
    objects: [],
    workload: 'idle',
    fill: 'zero',
    serial: 'none',
  };
  for (let i = 0; i < argv.length; i++) {
    const raw = argv[i]!;
    if (!raw.startsWith('-')) throw new UsageError(`${raw}: invalid option`);
    const opt = raw.replace(/^--?/, '');
    if (FLAGS.has(opt)) {
      if (opt === 'S') a.startPaused = true;
      if (opt === 'mem-prealloc') a.memPrealloc = true;
      continue;
    }
    const canon = WITH_ARG.get(opt);
    if (!canon) throw new UsageError(`-${opt}: invalid option`);
    const val = argv[++i];
    if (val === undefined) throw new UsageError(`-${opt}: requires an argument`);
    switch (canon) {
      case 'm': {
        const o = parseOptString(val, 'size');
        if (!o.size) throw new UsageError(`-m ${val}: missing 'size'`);
        a.ramSize = o.size;
        break;
      }
      case 'smp': {
        const o = parseOptString(val, 'cpus');
        const n = Number(o.cpus ?? '1');
        if (!Number.isInteger(n) || n < 1 || n > 64) {
          throw new UsageError(`-smp ${val}: Invalid CPU topology: cpus must be between 1 and 64`);
        }
        a.smp = n;
        break;
      }
      case 'name': {
        const o = parseOptString(val, 'guest');
        a.name = o.guest;
        break;
      }
      case 'qmp':
        a.qmp.push(val);
        break;
      case 'monitor':
        // -monitor is the HMP monitor in QEMU; we only speak QMP there too if asked with mode=control
        a.qmp.push(val);
        break;
      case 'incoming':
        a.incoming = val;
        break;
      case 'object': {
        const o = parseOptString(val, 'qom-type');
        const qomType = o['qom-type'];
        const id = o.id;
        if (!qomType) throw new UsageError(`-object ${val}: Parameter 'qom-type' is missing`);
        if (!id) throw new UsageError(`-object ${val}: Parameter 'id' is missing`);
        delete o['qom-type'];
        delete o.id;
        a.objects.push({ qomType, id, props: o });
        break;
      }
      case 'machine': {
        const o = parseOptString(val, 'type');
        if (o.type) a.machineType = o.type;
        if (o['memory-backend']) a.memoryBackend = o['memory-backend'];
        if (o['x-qemu-compat'] !== undefined) a.qemuCompat = o['x-qemu-compat'] === 'on';
        break;
      }
      case 'workload':
        a.workload = val;
        break;
      case 'fill':
        a.fill = val;
        break;
      case 'serial':
        a.serial = val;
        break;
      default:
        // -display, -accel, -vga: accepted for command-line compatibility, no effect
        break;
    }
  }
  return a;
}
