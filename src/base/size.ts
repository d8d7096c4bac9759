/**
 * Size parsing in QEMU's style (`-m 512M`, `size=16M`, `wss=1G`).
 *
 * Accepted: a non-negative decimal number, optionally with a fraction, and an
 * optional case-insensitive suffix: B (bytes), K, M, G, T, P, E (powers of
 * 1024). Fractions are allowed with a suffix (`1.5G`) as long as the result
 * is a whole number of bytes. Plain numbers without a suffix are bytes
 * (the `ferry vm -m` front end may choose to treat a bare number as MiB, as
 * QEMU's -m does; that is the CLI's decision, not this function's).
 */

const SUFFIX: Record<string, number> = {
  '': 1,
  B: 1,
  K: 2 ** 10,
  M: 2 ** 20,
  G: 2 ** 30,
  T: 2 ** 40,
  P: 2 ** 50,
  E: 2 ** 60,
};

// number, optional unit letter, optional trailing 'B' after K..E ("512MB")
const RE = /^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kKmMgGtTpPeE])[bB]?|([bB]))?\s*$/;

/** Parses a size; throws Error with a clear message on anything invalid. */
export function parseSize(s: string, what = 'size'): number {
  if (typeof s !== 'string' || s.trim() === '') {
    throw new Error(`Invalid ${what} '${String(s)}': empty`);
  }
  const m = RE.exec(s);
  if (!m) {
    throw new Error(
      `Invalid ${what} '${s}': expected a number with an optional suffix B, K, M, G, T, P or E`,
    );
  }
  const num = Number(m[1]);
  const suf = (m[2] ?? m[3] ?? '').toUpperCase();
  const mult = SUFFIX[suf];
  if (mult === undefined) {
    throw new Error(`Invalid ${what} '${s}': unknown suffix '${m[2]}' (use B, K, M, G, T, P or E)`);
  }
  const v = num * mult;
  if (!Number.isFinite(v) || v > Number.MAX_SAFE_INTEGER) {
    throw new Error(`Invalid ${what} '${s}': too large`);
  }
  if (!Number.isInteger(v)) {
    throw new Error(`Invalid ${what} '${s}': not a whole number of bytes`);
  }
  return v;
}

/** Formats a byte count compactly: 16777216 -> "16M", 1536 -> "1.5K", 1000 -> "1000". */
export function formatSize(n: number): string {
  const units = ['E', 'P', 'T', 'G', 'M', 'K'];
  const mults = [2 ** 60, 2 ** 50, 2 ** 40, 2 ** 30, 2 ** 20, 2 ** 10];
  for (let i = 0; i < units.length; i++) {
    const m = mults[i]!;
    if (n >= m) {
      const q = n / m;
      if (Number.isInteger(q * 1000)) return `${+q.toFixed(3)}${units[i]}`;
    }
  }
  return String(n);
}
