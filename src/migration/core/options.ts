/**
 * Migration capabilities and parameters: defaults, ranges and merging rules
 * (docs/spec/qmp.md B.2–B.5, Part F). Everything here is plain data; the commands layer
 * maps thrown MigrationError messages to GenericError.
 */
import type {
  MigrationCapability,
  MigrationCapabilityStatus,
  MigrationParameters,
  MigrateSetParameters,
} from '../../generated/qapi-types.js';
import { MigrationError } from '../errors.js';

/** Enum order of MigrationCapability: also the order of query-migrate-capabilities. */
export const CAPABILITIES: readonly MigrationCapability[] = [
  'xbzrle', 'rdma-pin-all', 'auto-converge', 'zero-blocks', 'compress', 'events',
  'postcopy-ram', 'x-colo', 'release-ram', 'block', 'return-path', 'multifd',
];

/**
 * Capabilities whose feature this build does not implement yet. Turning one on
 * is refused with this text; it is never silently ignored.
 */
export const UNSUPPORTED_CAPABILITIES: ReadonlyMap<MigrationCapability, string> = new Map<MigrationCapability, string>([
  ['rdma-pin-all', "Capability 'rdma-pin-all' requires RDMA migration, which this build does not support"],
]);

export type Capabilities = Record<MigrationCapability, boolean>;

/** All parameters, every member present (query-migrate-parameters). */
export type Parameters = Required<MigrationParameters>;

export const DEFAULT_PARAMETERS: Readonly<Parameters> = Object.freeze({
  'compress-level': 1,
  'compress-threads': 8,
  'decompress-threads': 2,
  'cpu-throttle-initial': 20,
  'cpu-throttle-increment': 10,
  'tls-creds': '',
  'tls-hostname': '',
  'max-bandwidth': 32 << 20,
  'downtime-limit': 300,
  'x-checkpoint-delay': 200,
  'block-incremental': false,
  'multifd-channels': 2,
});

/** Largest downtime-limit in milliseconds (2000 s). */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;
/** SIZE_MAX on a 64-bit host, as QEMU reports it in range errors. */
const SIZE_MAX_TEXT = '18446744073709551615';

export const DEFAULT_XBZRLE_CACHE_SIZE = 64 << 20;

export class MigrationOptions {
  private caps: Capabilities;
  private params: Parameters;
  private cacheSize = DEFAULT_XBZRLE_CACHE_SIZE;
  private readonly listeners: Array<() => void> = [];

  constructor() {
    this.caps = Object.fromEntries(CAPABILITIES.map((c) => [c, false])) as Capabilities;
    this.params = { ...DEFAULT_PARAMETERS };
  }

  /** Called after every change of capabilities or parameters that was applied. */
  onChange(listener: () => void): void {
    this.listeners.push(listener);
  }

  private changed(): void {
    for (const l of this.listeners) l();
  }

  capability(c: MigrationCapability): boolean {
    return this.caps[c];
  }

  capabilityList(): MigrationCapabilityStatus[] {
    return CAPABILITIES.map((c) => ({ capability: c, state: this.caps[c] }));
  }

  /**
   * Merge a capability list into a copy of the current set, check the copy,
   * and only then apply it: a refused request changes nothing.
   */
  setCapabilities(list: readonly MigrationCapabilityStatus[]): void {
    const next = { ...this.caps };
    for (const { capability, state } of list) next[capability] = state;
    for (const c of CAPABILITIES) {
      if (next[c] && !this.caps[c]) {
        const why = UNSUPPORTED_CAPABILITIES.get(c);
        if (why) throw new MigrationError(why);
      }
    }
    if (next['postcopy-ram'] && next.compress) {
      throw new MigrationError('Postcopy is not currently compatible with compression');
    }
    this.caps = next;
    this.changed();
  }

  parameters(): Parameters {
    return { ...this.params };
  }

  get<K extends keyof Parameters>(k: K): Parameters[K] {
    return this.params[k];
  }

  /** Merge into a copy, check every value, then apply (all or nothing). */
  setParameters(p: MigrateSetParameters): void {
    const next: Parameters = { ...this.params };
    for (const [k, v] of Object.entries(p) as [keyof MigrateSetParameters, unknown][]) {
      if (v === undefined) continue;
      if (k === 'tls-creds' || k === 'tls-hostname') {
        next[k] = v === null ? '' : (v as string);
      } else {
        (next as Record<string, unknown>)[k] = v;
      }
    }
    checkParameters(next);
    this.params = next;
    this.changed();
  }

  xbzrleCacheSize(): number {
    return this.cacheSize;
  }

  /** migrate-set-cache-size: checks against guest RAM size, rounds down to a power of two. */
  setXbzrleCacheSize(value: number, guestRamSize: number): number {
    if (value < 0 || !Number.isSafeInteger(value)) {
      throw new MigrationError("Parameter 'cache size' expects exceeding address space");
    }
    if (value > guestRamSize) {
      throw new MigrationError("Parameter 'cache size' expects exceeds guest ram size ");
    }
    if (value < 4096) {
      throw new MigrationError("Parameter 'cache size' expects is smaller than page size");
    }
    this.cacheSize = 2 ** Math.floor(Math.log2(value));
    return this.cacheSize;
  }
}

function range(name: string, v: number, lo: number, hi: number): void {
  if (v < lo || v > hi) {
    throw new MigrationError(`Parameter '${name}' expects a value between ${lo} and ${hi}`);
  }
}

/** The range checks of migrate-set-parameters, in QEMU's order and words. */
export function checkParameters(p: Parameters): void {
  range('compress_level', p['compress-level'], 0, 9);
  range('compress_threads', p['compress-threads'], 1, 255);
  range('decompress_threads', p['decompress-threads'], 1, 255);
  if (p['cpu-throttle-initial'] < 1 || p['cpu-throttle-initial'] > 99) {
    throw new MigrationError(
      "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
    );
  }
  if (p['cpu-throttle-increment'] < 1 || p['cpu-throttle-increment'] > 99) {
    throw new MigrationError(
      "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
    );
  }
  if (p['max-bandwidth'] < 0) {
    throw new MigrationError(
      `Parameter 'max_bandwidth' expects an integer in the range of 0 to ${SIZE_MAX_TEXT} bytes/second`,
    );
  }
  if (p['downtime-limit'] < 0 || p['downtime-limit'] > MAX_DOWNTIME_LIMIT_MS) {
    throw new MigrationError(
      `Parameter 'downtime_limit' expects an integer in the range of 0 to ${MAX_DOWNTIME_LIMIT_MS} milliseconds`,
    );
  }
  range('multifd_channels', p['multifd-channels'], 1, 255);
  if (p['x-checkpoint-delay'] < 0) {
    throw new MigrationError("Parameter 'x_checkpoint_delay' expects is invalid, it should be positive");
  }
}
