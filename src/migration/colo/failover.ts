/**
 * Failover: QEMU's FailoverStatus (none → require → active → completed,
 * migration/colo-failover.c) with its texts, the heartbeat watch that can
 * fail over by itself, and the witness that keeps a cut link from making
 * two primaries (docs/colo.md, "Failover").
 *
 * Why a witness. When the link, not the peer, dies, both machines see the
 * same silence. If both then ran the guest alone, clients would talk to two
 * diverging copies. So before either fails over by itself it must win a
 * claim on storage both reach: an exclusive create (O_CREAT|O_EXCL) of
 * `colo-<pair id>.owner` in the witness directory. Exactly one create
 * succeeds; the loser keeps its guest stopped. The primary claims first
 * (at its timeout), the secondary only after the primary's timeout plus a
 * grace period, so a primary that still runs keeps the service instead of
 * handing it over. Without a witness a secondary never fails over by
 * itself (it cannot tell a dead primary from a dead link), and a primary
 * may: the secondary will not take over behind its back.
 */
import { openSync, readFileSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import type { FailoverStatus } from '../../generated/qapi-types.js';
import { strerror } from '../channel/errors.js';
import { MigrationError } from '../errors.js';

export const FAILOVER_ERR = {
  disabled: () => "The feature 'colo' is not enabled",
  alreadyActive: () => 'COLO failover is already activated',
  peerTookOver: (file: string) => `COLO: the peer has already claimed the pair (witness ${file}): this machine must not run the guest alone`,
  claim: (file: string, why: string) => `COLO: cannot claim the pair in the witness ${file}: ${why}`,
} as const;

export class Failover {
  status: FailoverStatus = 'none';
  /** Who asked: x-colo-lost-heartbeat, or the heartbeat watch. */
  by: 'request' | 'auto' | null = null;

  /** none → require; a second request is refused with QEMU's text. */
  request(by: 'request' | 'auto'): void {
    if (this.status !== 'none') throw new MigrationError(FAILOVER_ERR.alreadyActive());
    this.status = 'require';
    this.by = by;
  }

  get requested(): boolean {
    return this.status !== 'none';
  }

  activate(): void {
    if (this.status === 'require') this.status = 'active';
  }

  complete(): void {
    if (this.status === 'active') this.status = 'completed';
  }
}

/** Time a secondary waits beyond the primary's own timeout before it claims the witness. */
export function secondaryGraceMs(primaryTimeoutMs: number): number {
  return Math.max(1000, Math.ceil(primaryTimeoutMs / 2));
}

export type ClaimResult = { won: true; file: string } | { won: false; file: string; holder: string };

/**
 * Claim the pair in `dir` for `role`. Claiming again for the same role wins
 * again (a retried failover); the other role's claim loses. An I/O error
 * throws (a machine that cannot reach the witness must not run alone).
 */
export function claimWitness(dir: string, pairId: Buffer, role: 'primary' | 'secondary'): ClaimResult {
  const file = join(dir, `colo-${pairId.toString('hex')}.owner`);
  let fd: number;
  try {
    fd = openSync(file, 'wx', 0o644);
  } catch (e) {
    if ((e as { code?: string }).code !== 'EEXIST') throw new MigrationError(FAILOVER_ERR.claim(file, strerror(e)), { cause: e });
    let holder = '';
    try {
      holder = readFileSync(file, 'utf8').split(' ')[0] ?? '';
    } catch (e2) {
      throw new MigrationError(FAILOVER_ERR.claim(file, strerror(e2)), { cause: e2 });
    }
    return holder === role ? { won: true, file } : { won: false, file, holder };
  }
  try {
    writeSync(fd, `${role} pid=${process.pid} at=${new Date().toISOString()}\n`);
  } finally {
    closeSync(fd);
  }
  return { won: true, file };
}

/**
 * Watches for signs of life from the peer. `timeoutMs()` is read at every
 * check (the parameter may change); 0 switches the watch off. `expired`
 * runs once, when the peer has been silent that long.
 */
export class HeartbeatWatch {
  private last: number;
  private timer: NodeJS.Timeout | null = null;
  private fired = false;

  constructor(
    private readonly now: () => number,
    private readonly timeoutMs: () => number,
    private readonly expired: (silentMs: number) => void,
    checkEveryMs = 50,
  ) {
    this.last = now();
    this.timer = setInterval(() => this.check(), checkEveryMs);
    this.timer.unref();
  }

  alive(): void {
    this.last = this.now();
  }

  /** Milliseconds since the last sign of life. */
  get silentMs(): number {
    return this.now() - this.last;
  }

  private check(): void {
    const t = this.timeoutMs();
    if (this.fired || t <= 0) return;
    const silent = this.silentMs;
    if (silent < t) return;
    this.fired = true;
    this.expired(silent);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
