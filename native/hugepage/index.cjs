'use strict';
// Loader for the optional ferry_hugepage addon, with a pure-JS fallback:
// when the addon is not built (or fails to load) every call returns false
// and nothing else changes. `available` says which one you got.
//
//   const hp = require('../../native/hugepage/index.cjs');       // CommonJS
//   import { createRequire } from 'node:module';                  // ESM
//   const hp = createRequire(import.meta.url)('<path>/native/hugepage/index.cjs');
//   hp.madviseHugepage(sab) -> boolean
const path = require('node:path');

let addon = null;
let loadError = null;
if (process.env.FERRY_NO_NATIVE !== '1') {
  for (const dir of ['build/Release', 'build/Debug']) {
    try {
      addon = require(path.join(__dirname, dir, 'ferry_hugepage.node'));
      break;
    } catch (e) {
      loadError = e;
    }
  }
}

module.exports = {
  available: addon !== null,
  loadError: addon ? null : loadError,
  /** madvise(MADV_HUGEPAGE) over the buffer's memory; false without the addon. */
  madviseHugepage(buf) {
    return addon ? addon.madviseHugepage(buf) : false;
  },
  /** 'hugepage' | 'nohugepage' | 'willneed' | 'populate_write'; false without the addon. */
  madviseAdvice(buf, name) {
    return addon ? addon.madviseAdvice(buf, name) : false;
  },
};
