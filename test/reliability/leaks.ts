/**
 * What a cell must give back: descriptors, listeners and sockets, child
 * processes. A snapshot before, another after the cell was torn down, and
 * a wait (bounded) for the two to agree: worker threads and closed sockets
 * release their descriptors a little after close() returns.
 */
import { readFileSync, readdirSync } from 'node:fs';

export interface Resources {
  fds: number;
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
  return { fds: readdirSync('/proc/self/fd').length, handles, children: childPids() };
}

function same(a: Resources, b: Resources): boolean {
  return a.fds === b.fds && JSON.stringify(a.handles) === JSON.stringify(b.handles) && b.children.every((c) => a.children.includes(c));
}

/** Waits up to `ms` for the resources to be back at `before`; the leak, if any, as text. */
export async function leaked(before: Resources, ms = 5000): Promise<string | null> {
  const t0 = Date.now();
  let now = snapshot();
  while (!same(before, now)) {
    if (Date.now() - t0 > ms) return `before ${JSON.stringify(before)}, after ${JSON.stringify(now)}`;
    await new Promise((r) => setTimeout(r, 20));
    now = snapshot();
  }
  return null;
}
