/**
 * `ferry-block-drives`: a Ferry-only live section that tells a Ferry
 * destination, before any chunk, which drives a block migration copies and
 * how big they are, so that a missing drive, a drive of another size or (with
 * `inc`) a drive without a backing file fails the migration at once with a
 * clear text, not after gigabytes (QEMU's stream has no such list: its
 * destination finds a missing drive at the first chunk and a different size
 * not at all). Sent only beside the `block` section and never to a QEMU
 * destination (`x-qemu-compat`); a Ferry destination loads it whenever it
 * comes.
 *
 * START payload: be32 count, then per drive its counted name, be64 size in
 * bytes and a u8 of flags (bit 0: incremental). END payload: empty. It has
 * nothing pending, so it never gets a PART.
 */
import type {
  IncomingSectionContext,
  LiveSection,
  OutgoingSectionContext,
  Pending,
  SectionKind,
  SectionLoader,
  SectionType,
} from '../sections/section.js';
import type { DrivePort } from '../core/port.js';
import type { StreamReader } from '../stream/reader.js';
import type { StreamWriter } from '../stream/writer.js';
import { MigrationStreamError } from '../wire/errors.js';
import { BLOCK_ERR } from './errors.js';

export const BLOCK_DRIVES_IDSTR = 'ferry-block-drives';
const IDSTR = BLOCK_DRIVES_IDSTR;
/** More drives than any machine has (QEMU's pc takes 4 IDE drives; virtio and none are unbounded in theory). */
const MAX_DRIVES = 4096;
const FLAG_INCREMENTAL = 1;

export const BLOCK_DRIVES_SECTION: SectionType = {
  idstr: IDSTR,
  instanceId: 0,
  version: 1,
  minVersion: 1,
  save: (ctx) => (ctx.options.capability('block') && !ctx.qemuCompatible ? new DrivesSave(ctx) : null),
  load: (ctx) => new DrivesCheck(ctx),
};

class DrivesSave implements LiveSection {
  readonly idstr = IDSTR;
  readonly instanceId = 0;
  readonly version = 1;
  private readonly none: Pending = { precopy: 0, postcopy: 0 };

  constructor(private readonly ctx: OutgoingSectionContext) {}

  setup(w: StreamWriter): void {
    // the drives block migration copies: the writable ones (BlockSender)
    const drives = this.ctx.machine.drives.filter((d) => !d.readOnly);
    const inc = this.ctx.options.get('block-incremental');
    w.put32(drives.length);
    for (const d of drives) {
      w.putCountedString(d.name);
      w.put64(d.size);
      w.put8(inc ? FLAG_INCREMENTAL : 0);
    }
  }

  pending(): Pending {
    return this.none;
  }

  iterate(): void {
    /* never called: nothing pending */
  }

  async completePrecopy(): Promise<void> {
    /* empty END payload */
  }

  cleanup(): void {
    /* nothing held */
  }
}

/** One drive of the source's list. */
export interface ListedDrive {
  name: string;
  size: number;
  incremental: boolean;
}

/** A START payload's list (`onDrive` sees each entry as it is read). */
export async function readDriveList(r: StreamReader, onDrive: (d: ListedDrive) => void): Promise<void> {
  if (!r.has(4)) await r.ensure(4);
  const n = r.get32();
  if (n > MAX_DRIVES) throw new MigrationStreamError(BLOCK_ERR.badDriveList(`${n} drives`));
  const seen = new Set<string>();
  for (let i = 0; i < n; i++) {
    const name = await r.readCountedString();
    if (!r.has(9)) await r.ensure(9);
    const size = r.get64();
    const flags = r.get8();
    if (seen.has(name)) throw new MigrationStreamError(BLOCK_ERR.badDriveList(`drive '${name}' listed twice`));
    seen.add(name);
    onDrive({ name, size, incremental: (flags & FLAG_INCREMENTAL) !== 0 });
  }
}

/** Checks the source's list against this machine's drives (START); END is empty. */
class DrivesCheck implements SectionLoader {
  constructor(private readonly ctx: IncomingSectionContext) {}

  async load(r: StreamReader, kind: SectionKind): Promise<void> {
    if (kind !== 'start') return;
    await readDriveList(r, (d) => checkDrive(this.ctx.machine.drives, d.name, d.size, d.incremental));
  }
}

/** The destination's drive for a source drive of `size` bytes, or QEMU-style errors. */
export function checkDrive(drives: readonly DrivePort[], name: string, size: number, incremental: boolean): DrivePort {
  const d = drives.find((x) => x.name === name);
  if (d === undefined) throw new MigrationStreamError(BLOCK_ERR.unknownDevice(name));
  if (d.size !== size) throw new MigrationStreamError(BLOCK_ERR.sizeMismatch(name, size, d.size));
  if (d.readOnly) throw new MigrationStreamError(BLOCK_ERR.readOnly(name));
  if (incremental && d.backingDepth === 0) throw new MigrationStreamError(BLOCK_ERR.noBacking(name));
  return d;
}
