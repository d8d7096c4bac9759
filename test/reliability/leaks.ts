/**
 * What a cell must give back: descriptors, listeners and sockets, child
 * processes. A snapshot right before the cell, another after it was torn
 * down, and a wait (polled every 20 ms, bounded) for the two to agree:
 * worker threads and closed sockets release their descriptors a little
 * after close() returns. A leak names its descriptors (readlink of
 * /proc/self/fd/N).
 */
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';

export interface Resources {
  fds: number;
  /** descriptor number -> what it is (readlink of /proc/self/fd/N: a path, socket:[inode], pipe:[inode], anon_inode:...) */
  fdTargets: Record<string, string>;
  /** libuv handles by type, leaving out timers (the test runner's own come and go) */
  handles: Record<string, number>;
  children: number[];
}

export function childPids(): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'latin1');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === process.pid) out.push(Number(d));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export function snapshot(): Resources {
  const handles: Record<string, number> = {};
  for (const h of process.getActiveResourcesInfo()) {
    if (h === 'Timeout' || h === 'Immediate' || h === 'FSReqCallback' || h === 'TTYWrap') continue;
    handles[h] = (handles[h] ?? 0) + 1;
  }
  const fdTargets: Record<string, string> = {};
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      fdTargets[fd] = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      // the directory's own descriptor, closed by now
    }
  }
  return { fds: Object.keys(fdTargets).length, fdTargets, handles, children: childPids() };
}

/** The descriptors open now that were not (or were something else) before, and those closed since. */
function fdChanges(before: Resources, after: Resources): string {
  const opened = Object.entries(after.fdTargets).filter(([fd, t]) => before.fdTargets[fd] !== t);
  const closed = Object.entries(before.fdTargets).filter(([fd, t]) => after.fdTargets[fd] !== t);
  const list = (xs: [string, string][]): string => (xs.length ? xs.map(([fd, t]) => `${fd} -> ${t}`).join(', ') : 'none');
  return `descriptors opened and not closed: ${list(opened)}; closed: ${list(closed)}`;
}

/** Nothing more than `a` held (a cell may end after something of an earlier one finally closed). */
function same(a: Resources, b: Resources): boolean {
  return b.fds <= a.fds && Object.entries(b.handles).every(([k, n]) => n <= (a.handles[k] ?? 0)) && b.children.every((c) => a.children.includes(c));
}

/** Waits up to `ms` for the resources to be back at `before`; the leak, if any, as text. */
export async function leaked(before: Resources, ms = 5000): Promise<string | null> {
  const t0 = Date.now();
  let now = snapshot();
  while (!same(before, now)) {
    if (Date.now() - t0 > ms) {
      const counts = (r: Resources): string => JSON.stringify({ fds: r.fds, handles: r.handles, children: r.children });
      return `before ${counts(before)}, after ${counts(now)}; ${fdChanges(before, now)}`;
    }
    await new Promise((r) => setTimeout(r, 20));
    now = snapshot();
  }
  return null;
}
