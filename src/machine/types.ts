/** Target page size: 4 KiB, as on x86 (TARGET_PAGE_BITS = 12). */
export const TARGET_PAGE_BITS = 12;
export const TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS;

/**
 * One guest RAM block. `bytes` and `dirty` are views over SharedArrayBuffers
 * that the vCPU workers share. `dirty` has one bit per target page
 * (bit i of word i>>5 is page i); a vCPU sets it with Atomics.or on every write,
 * a migration takes it with Atomics.exchange(dirty, w, 0).
 */
export interface RamBlock {
  readonly name: string;
  /** used_length in bytes, a multiple of TARGET_PAGE_SIZE */
  readonly size: number;
  readonly pages: number;
  readonly bytes: Uint8Array;
  readonly dirty: Int32Array;
}

/** QEMU run states that Ferry uses (QAPI RunState names). */
export type RunState =
  | 'prelaunch'
  | 'running'
  | 'paused'
  | 'inmigrate'
  | 'finish-migrate'
  | 'postmigrate'
  | 'shutdown'
  | 'internal-error';

/**
 * A device whose state travels in the migration stream as one FULL section.
 * `idstr`/`instanceId`/`version` are the section header fields.
 */
export interface MigratableDevice {
  readonly idstr: string;
  readonly instanceId: number;
  readonly version: number;
  /** Oldest stream version load() accepts. */
  readonly minVersion: number;
  /** Whether the section is sent at all (QEMU's vmsd `needed`). Default true. */
  needed?(): boolean;
  save(): Uint8Array;
  /** Throws Error with a clear message on a malformed payload. */
  load(data: Uint8Array, version: number): void;
  /** Exact payload size for a given version, or undefined if variable. */
  payloadSize?(version: number): number | undefined;
}

/*
 * Payload framing rule used by the migration layer: when `payloadSize(v)`
 * returns a number the payload is written raw (QEMU's fixed vmstate layouts,
 * e.g. `timer` 24 bytes, `globalstate` 104 bytes); otherwise the migration
 * layer writes a be32 length before the payload, so our own devices are
 * self-delimiting in the stream.
 */
