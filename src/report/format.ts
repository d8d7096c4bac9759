/** Figures as people read them: the report page and the command-line views share these. */

/** Bytes in binary units ("1.06 GiB"). */
export function fmtBytes(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

/** Milliseconds, as seconds from 10 s on. */
export function fmtMs(ms: number | undefined): string {
  if (ms === undefined || !Number.isFinite(ms)) return '-';
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

/** QEMU's mbps is megabits per second (10^6); shown as megabytes per second. */
export function fmtMBps(mbps: number | undefined): string {
  if (mbps === undefined || !Number.isFinite(mbps)) return '-';
  return `${(mbps / 8).toFixed(1)} MB/s`;
}

/** A duration to come, in seconds ("12 s", "1.4 s", "3 min 05 s"). */
export function fmtEta(ms: number | undefined): string {
  if (ms === undefined || !Number.isFinite(ms)) return '-';
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s - m * 60)).padStart(2, '0')} s`;
}
