/**
 * The destination's side of postcopy (docs/spec/stream-format.md §9.5, §10,
 * §11): QEMU's postcopy states and their commands.
 *
 *   ADVISE    none -> advise; checks the page sizes. Ignored (with a notice)
 *             when postcopy-ram is off here: a precopy can still complete.
 *   DISCARD   advise|discard -> discard; marks the pages missing (discard.ts).
 *   LISTEN    advise|discard -> listening; the loaders place pages only
 *             where they are missing, demand paging starts, the status
 *             becomes postcopy-active. Needs the return path.
 *   RUN       listening -> running; the guest starts (inside the package).
 *   EOF       running -> end; every page must be present by now.
 *
 * While running, a vCPU that touches a missing page blocks; its fault
 * becomes one page request on the return path, and the vCPU goes on once
 * the page is placed (placement.ts). If anything fails after LISTEN, the
 * session stops the guest for good (run state internal-error): it never runs
 * on with holes in its memory.
 */
import { bitmapWords, countClear, setBit, testBit } from '../../base/bitmap.js';
import { TARGET_PAGE_SIZE } from '../../machine/types.js';
import type { MachinePort } from '../core/port.js';
import type { MigrationOptions } from '../core/options.js';
import type { ReturnPathWriter } from '../return-path/writer.js';
import type { StreamReader } from '../stream/reader.js';
import { ERR, MigrationStreamError } from '../wire/errors.js';
import type { Command } from '../wire/records.js';
import { applyDiscard } from './discard.js';

/** Read-ahead of the main stream in postcopy (see StreamReader.setHighWater). */
const POSTCOPY_READ_AHEAD = 16 * 1024;

/** QEMU's PostcopyState numbers (they appear in its error texts). */
export const enum PostcopyState {
  None = 0,
  Advise = 1,
  Discard = 2,
  Listening = 3,
  Running = 4,
  End = 5,
}

export interface PostcopyIncomingHost {
  readonly machine: MachinePort;
  readonly options: MigrationOptions;
  readonly returnPath: ReturnPathWriter;
  /** The main stream's reader (its read-ahead shrinks at LISTEN). */
  readonly reader: StreamReader;
  /** LISTEN: every loader switches to postcopy placement. */
  listen(): void;
  /** Status postcopy-active. */
  enterPostcopy(): void;
  /** RUN: the guest starts. */
  startGuest(): Promise<void>;
  log(msg: string): void;
}

export type PostcopyCommand = Extract<Command, { cmd: 'POSTCOPY_ADVISE' | 'POSTCOPY_RAM_DISCARD' | 'POSTCOPY_LISTEN' | 'POSTCOPY_RUN' }>;

export class PostcopyIncoming {
  state = PostcopyState.None;
  /** Pages requested on the return path, per block (one request per page). */
  private requested: Uint32Array[] = [];

  constructor(private readonly host: PostcopyIncomingHost) {}

  /** After LISTEN: the guest may run on pages from the stream, so a failure must stop it for good. */
  get listening(): boolean {
    return this.state >= PostcopyState.Listening;
  }

  async command(c: PostcopyCommand): Promise<'run' | void> {
    const h = this.host;
    switch (c.cmd) {
      case 'POSTCOPY_ADVISE':
        if (!h.options.capability('postcopy-ram')) {
          // as QEMU 7.2: a precopy can still complete; a switch will fail below
          h.log('Postcopy advice ignored: the postcopy-ram capability is off on the destination');
          return;
        }
        if (this.state !== PostcopyState.None) throw wrongState('CMD_POSTCOPY_ADVISE', this.state);
        if (c.pageSizeSummary !== TARGET_PAGE_SIZE) {
          throw new MigrationStreamError(ERR.postcopyPageSizes(c.pageSizeSummary, TARGET_PAGE_SIZE));
        }
        if (c.targetPageSize !== TARGET_PAGE_SIZE) {
          throw new MigrationStreamError(ERR.postcopyTargetPageSizes(c.targetPageSize, TARGET_PAGE_SIZE));
        }
        this.state = PostcopyState.Advise;
        return;
      case 'POSTCOPY_RAM_DISCARD':
        if (this.state !== PostcopyState.Advise && this.state !== PostcopyState.Discard) {
          throw wrongState('CMD_POSTCOPY_RAM_DISCARD', this.state);
        }
        this.state = PostcopyState.Discard;
        applyDiscard(h.machine.ram, c.blockName, c.ranges);
        return;
      case 'POSTCOPY_LISTEN':
        if (this.state !== PostcopyState.Advise && this.state !== PostcopyState.Discard) {
          throw wrongState('CMD_POSTCOPY_LISTEN', this.state);
        }
        if (!h.returnPath.isOpen) throw new MigrationStreamError('Postcopy needs a return path');
        this.state = PostcopyState.Listening;
        h.listen();
        h.reader.setHighWater(POSTCOPY_READ_AHEAD);
        this.requested = h.machine.ram.map((b) => new Uint32Array(bitmapWords(b.pages)));
        h.machine.beginDemandPaging((b, page) => this.onFault(b, page));
        h.enterPostcopy();
        return;
      case 'POSTCOPY_RUN':
        if (this.state !== PostcopyState.Listening) throw wrongState('CMD_POSTCOPY_RUN', this.state);
        this.state = PostcopyState.Running;
        await h.startGuest();
        return 'run';
    }
  }

  /** A vCPU touched a missing page: ask the source for it (once). */
  private onFault(block: number, page: number): void {
    const req = this.requested[block];
    if (!req || !this.host.returnPath.isOpen || this.state !== PostcopyState.Running) return;
    const b = this.host.machine.ram[block]!;
    // already asked for, or arrived since the vCPU posted the fault
    if (testBit(req, page) || testBit(b.present, page)) return;
    setBit(req, page);
    this.host.returnPath.requestPages(block, b.name, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
  }

  /** EOF of a postcopy stream: all of RAM is here, vCPUs stop checking. */
  end(): void {
    let missing = 0;
    for (const b of this.host.machine.ram) missing += countClear(b.present, b.pages);
    if (missing > 0) throw new MigrationStreamError(ERR.postcopyPagesMissing(missing));
    this.host.machine.endDemandPaging();
    this.state = PostcopyState.End;
  }
}

function wrongState(cmd: string, state: PostcopyState): MigrationStreamError {
  return new MigrationStreamError(ERR.postcopyWrongState(cmd, state));
}
