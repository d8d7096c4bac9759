/**
 * The XBZRLE page cache (docs/spec/xbzrle.md §4): a direct-mapped cache of page copies,
 * sender side only, as QEMU's page_cache.c.
 *
 * * size = the cache-size parameter rounded down to a power of two; slots =
 *   size / page size (also a power of two);
 * * slot of a page = (ram_address / page size) & (slots - 1);
 * * each slot holds the page address, an age (the dirty-sync count when it was
 *   last written or hit) and the page copy;
 * * a lookup hits when the slot holds the same address, and refreshes the age;
 * * an insert into a slot holding another page is refused while that page is
 *   fresh: age + CACHED_PAGE_LIFETIME > current sync count; an empty slot or
 *   a slot of the same page is always written.
 *
 * All page copies live in one preallocated buffer: no allocation per page.
 * `resize()` to a different size replaces the cache with an empty one (2.10).
 */
import { copyBytes } from '../../base/native.js';

/** A cached page stays fresh for this many dirty-bitmap syncs. */
export const CACHED_PAGE_LIFETIME = 2;

/** Largest power of two <= v (v >= 1). */
export function pow2floor(v: number): number {
  if (!(v >= 1)) return 0;
  return 2 ** Math.floor(Math.log2(v));
}

export class XbzrleCache {
  readonly pageSize: number;
  /** Cache size in bytes (a power of two). */
  private sizeBytes = 0;
  private slots = 0;
  private mask = 0;
  /** Page address per slot (ram_address / page size), -1 = empty. */
  private addr: Float64Array = new Float64Array(0);
  /** Age per slot (dirty-sync count when last written or hit). */
  private age: Float64Array = new Float64Array(0);
  /** All page copies, slot i at i * pageSize. */
  private data: Uint8Array = new Uint8Array(0);
  /** Slots in use. */
  items = 0;

  constructor(size: number, pageSize = 4096) {
    this.pageSize = pageSize;
    this.allocate(size);
  }

  get size(): number {
    return this.sizeBytes;
  }

  get numSlots(): number {
    return this.slots;
  }

  private allocate(size: number): void {
    const slots = pow2floor(Math.floor(size / this.pageSize));
    if (slots < 1) throw new RangeError(`XBZRLE cache size ${size} is smaller than a page`);
    this.slots = slots;
    this.mask = slots - 1;
    this.sizeBytes = slots * this.pageSize;
    this.addr = new Float64Array(slots).fill(-1);
    this.age = new Float64Array(slots);
    this.data = new Uint8Array(this.sizeBytes);
    this.items = 0;
  }

  /**
   * Change the size. The same (rounded) size keeps the cache; another size
   * replaces it with an empty one, so the following pages miss (2.10).
   * Returns the new size in bytes.
   */
  resize(newSize: number): number {
    const slots = pow2floor(Math.floor(newSize / this.pageSize));
    if (slots === this.slots) return this.sizeBytes;
    this.allocate(newSize);
    return this.sizeBytes;
  }

  /** Drop the page copies (migration cleanup); the cache is empty and unusable afterwards. */
  free(): void {
    this.addr = new Float64Array(0);
    this.age = new Float64Array(0);
    this.data = new Uint8Array(0);
    this.slots = 0;
    this.items = 0;
  }

  /** Slot index of a page (page = ram_address / page size). */
  slotOf(page: number): number {
    // page numbers stay below 2^53 / 4096; the mask is < 2^31 for sane sizes
    return page < 0x80000000 ? page & this.mask : page % this.slots;
  }

  /** Whether the page is cached; a hit refreshes its age (cache_is_cached). */
  lookup(page: number, currentAge: number): boolean {
    const s = this.slotOf(page);
    if (this.addr[s] === page) {
      this.age[s] = currentAge;
      return true;
    }
    return false;
  }

  /** Peek without refreshing the age. */
  has(page: number): boolean {
    return this.slots > 0 && this.addr[this.slotOf(page)] === page;
  }

  /**
   * Offset of the page's copy in `buffer` (the page must be cached).
   * Writers may update the copy in place.
   */
  offsetOf(page: number): number {
    return this.slotOf(page) * this.pageSize;
  }

  /** The buffer that holds every page copy. */
  get buffer(): Uint8Array {
    return this.data;
  }

  /** A view of the page's cached copy (the page must be cached). */
  get(page: number): Uint8Array {
    const off = this.offsetOf(page);
    return this.data.subarray(off, off + this.pageSize);
  }

  /**
   * Insert (or overwrite) the page's copy from src[srcOffset, +pageSize).
   * Refused (returns -1) when the slot holds another page that is still
   * fresh; otherwise returns the offset of the copy in `buffer`.
   */
  insert(page: number, src: Uint8Array, srcOffset: number, currentAge: number): number {
    const s = this.slotOf(page);
    const cur = this.addr[s]!;
    if (cur !== -1 && cur !== page && this.age[s]! + CACHED_PAGE_LIFETIME > currentAge) return -1;
    if (cur === -1) this.items++;
    const off = s * this.pageSize;
    copyBytes(this.data, off, src, srcOffset, this.pageSize);
    this.addr[s] = page;
    this.age[s] = currentAge;
    return off;
  }

  /** Insert an all-zero page copy (same rules as insert). */
  insertZero(page: number, currentAge: number): number {
    const s = this.slotOf(page);
    const cur = this.addr[s]!;
    if (cur !== -1 && cur !== page && this.age[s]! + CACHED_PAGE_LIFETIME > currentAge) return -1;
    if (cur === -1) this.items++;
    const off = s * this.pageSize;
    this.data.fill(0, off, off + this.pageSize);
    this.addr[s] = page;
    this.age[s] = currentAge;
    return off;
  }
}
