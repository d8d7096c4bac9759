/**
 * Optional native helpers (native/*), each with a pure-JS fallback: when an
 * addon is not built, or FERRY_NO_NATIVE=1, the calls do nothing and return
 * false.
 */
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

interface HugepageAddon {
  available: boolean;
  madviseHugepage(buf: SharedArrayBuffer | ArrayBuffer): boolean;
  madviseAdvice(buf: SharedArrayBuffer | ArrayBuffer, advice: string): boolean;
}

/** dist/src/base → repo root (three up), where native/ lives. */
const root = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
let hugepage: HugepageAddon | null | undefined;

function loadHugepage(): HugepageAddon | null {
  if (hugepage !== undefined) return hugepage;
  try {
    hugepage = createRequire(import.meta.url)(resolve(root, 'native/hugepage/index.cjs')) as HugepageAddon;
  } catch {
    hugepage = null;
  }
  return hugepage;
}

/**
 * Ask the kernel to back this buffer with transparent huge pages, as QEMU
 * does for guest RAM (THP is madvise-only on our hosts). Must be called
 * before the memory is first touched. Returns whether the advice was given.
 */
export function adviseHugepages(buf: SharedArrayBuffer): boolean {
  const hp = loadHugepage();
  return hp !== null && hp.available && hp.madviseHugepage(buf);
}

/**
 * Fault every page of the buffer in for writing without changing its
 * contents (MADV_POPULATE_WRITE). Blocks the calling thread: call it from a
 * worker. Returns false when the addon or the kernel cannot do it.
 */
export function populateWrite(buf: SharedArrayBuffer): boolean {
  const hp = loadHugepage();
  return hp !== null && hp.available && hp.madviseAdvice(buf, 'populate_write');
}
