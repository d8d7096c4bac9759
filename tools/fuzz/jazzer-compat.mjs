/**
 * Makes the libFuzzer addon of @jazzer.js/fuzzer load on Debian 12.
 *
 * The addon ships prebuilt inside the npm package (the only way it installs
 * here: its source build downloads from GitHub), built against glibc 2.38
 * and GCC 13's libstdc++. It needs three symbols this system's libraries
 * lack: __isoc23_strtol and __isoc23_strtoul (C23's strtol/strtoul, which
 * also parse "0b" prefixes, unused by libFuzzer's flag parsing) and
 * std::ios_base_library_init() (GCC 13's iostream initialisation, which
 * older libstdc++ does through the std::ios_base::Init constructor).
 *
 * If the addon does not load, this rewrites its dynamic symbol table in place
 * (the original is kept as *.orig): the three imports are renamed to
 * strtol@GLIBC_2.2.5, strtoul@GLIBC_2.2.5 and std::ios_base::Init::Init()
 * @GLIBCXX_3.4 (the names are shorter, so they fit in the string table), and
 * the GLIBC_2.38 / GLIBCXX_3.4.32 version needs are marked weak. Idempotent;
 * does nothing where the addon loads as shipped or is not installed.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

const require = createRequire(import.meta.url);
const RENAME = new Map([
  ['__isoc23_strtol', ['strtol', 'GLIBC_2.2.5']],
  ['__isoc23_strtoul', ['strtoul', 'GLIBC_2.2.5']],
  ['_ZSt21ios_base_library_initv', ['_ZNSt8ios_base4InitC1Ev', 'GLIBCXX_3.4']],
]);
const WEAKEN = ['GLIBC_2.38', 'GLIBCXX_3.4.32'];
const VER_FLG_WEAK = 2;

function addonPath() {
  let dir;
  try {
    dir = join(require.resolve('@jazzer.js/fuzzer/package.json'), '..', 'prebuilds');
  } catch {
    return null;
  }
  const f = join(dir, `fuzzer-${process.platform}-${process.arch}.node`);
  return existsSync(f) ? f : null;
}

function loads(file) {
  try {
    require(file);
    return null;
  } catch (e) {
    return e;
  }
}

/** Rewrites the ELF64 little-endian shared object `b` (see the header). */
function patch(b) {
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const shstrndx = b.readUInt16LE(0x3e);
  const cstr = (off) => b.toString('latin1', off, b.indexOf(0, off));
  const secs = [];
  for (let i = 0; i < shnum; i++) {
    const o = shoff + i * shentsize;
    secs.push({ nameOff: b.readUInt32LE(o), off: Number(b.readBigUInt64LE(o + 0x18)), size: Number(b.readBigUInt64LE(o + 0x20)) });
  }
  for (const s of secs) s.name = cstr(secs[shstrndx].off + s.nameOff);
  const sec = (n) => {
    const s = secs.find((x) => x.name === n);
    if (!s) throw new Error(`no ${n} section`);
    return s;
  };
  const dynsym = sec('.dynsym');
  const dynstr = sec('.dynstr');
  const versym = sec('.gnu.version');
  const verneed = sec('.gnu.version_r');
  // version needs: name -> { aux offset, index }
  const vers = new Map();
  for (let vn = verneed.off; ; ) {
    const cnt = b.readUInt16LE(vn + 2);
    let aux = vn + b.readUInt32LE(vn + 8);
    for (let i = 0; i < cnt; i++) {
      vers.set(cstr(dynstr.off + b.readUInt32LE(aux + 8)), { aux, index: b.readUInt16LE(aux + 6) });
      const next = b.readUInt32LE(aux + 12);
      if (next === 0) break;
      aux += next;
    }
    const next = b.readUInt32LE(vn + 12);
    if (next === 0) break;
    vn += next;
  }
  let renamed = 0;
  for (let i = 0; i < dynsym.size / 24; i++) {
    const o = dynsym.off + i * 24;
    const nameAt = dynstr.off + b.readUInt32LE(o);
    const to = RENAME.get(cstr(nameAt));
    if (!to) continue;
    const v = vers.get(to[1]);
    if (!v) throw new Error(`the addon needs no ${to[1]}`);
    b.write(`${to[0]}\0`, nameAt, 'latin1');
    b.writeUInt16LE(v.index, versym.off + i * 2);
    renamed++;
  }
  for (const name of WEAKEN) {
    const v = vers.get(name);
    if (v) b.writeUInt16LE(b.readUInt16LE(v.aux + 4) | VER_FLG_WEAK, v.aux + 4);
  }
  return renamed;
}

const file = addonPath();
if (file !== null && process.platform === 'linux' && process.arch === 'x64') {
  const err = loads(file);
  if (err !== null && /version `(GLIBC_2\.38|GLIBCXX_3\.4\.32)' not found/.test(String(err.message))) {
    if (!existsSync(`${file}.orig`)) copyFileSync(file, `${file}.orig`);
    const b = readFileSync(`${file}.orig`);
    const n = patch(b);
    writeFileSync(file, b);
    const again = loads(file);
    if (again !== null) throw new Error(`jazzer-compat: the patched addon still does not load: ${again.message}`);
    console.log(`jazzer-compat: ${file}: ${n} imports renamed, it loads now`);
  }
}
