'use strict';
// Loader for the optional ferry_malloc_tune addon, with a pure-JS fallback:
// without it (or with FERRY_NO_NATIVE=1) keepFreedHeap() returns false and
// glibc keeps its defaults.
const path = require('node:path');

let addon = null;
if (process.env.FERRY_NO_NATIVE !== '1') {
  for (const dir of ['build/Release', 'build/Debug']) {
    try {
      addon = require(path.join(__dirname, dir, 'ferry_malloc_tune.node'));
      break;
    } catch {
      /* next */
    }
  }
}

module.exports = {
  available: addon !== null,
  /** mallopt(M_TRIM_THRESHOLD, trim) and mallopt(M_TOP_PAD, pad); false without the addon or glibc. */
  keepFreedHeap(trim, pad) {
    return addon ? addon.keepFreedHeap(trim, pad) : false;
  },
};
