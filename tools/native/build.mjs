// Builds the optional native addons under native/, each on its own: one that
// fails to build leaves the others, and Ferry uses the pure-JS fallback for
// it. node-gyp comes with npm; the Node headers are taken from /usr (Debian's
// nodejs-dev layout) when they are there, so no download is needed.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const addons = ['hugepage', 'pages', 'scm-rights', 'tls-config', 'malloc-tune'];

function nodeGyp() {
  for (const p of [join(dirname(process.execPath), '../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'), '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js']) {
    if (existsSync(p)) return p;
  }
  try {
    return createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js');
  } catch {
    return null;
  }
}

const gyp = nodeGyp();
const nodedir = existsSync('/usr/include/node/node.h') ? ['--nodedir=/usr'] : [];
for (const name of addons) {
  const dir = join(root, 'native', name);
  const r = gyp === null ? null : spawnSync(process.execPath, [gyp, 'rebuild', ...nodedir], { cwd: dir, encoding: 'utf8' });
  if (r === null || r.status !== 0) {
    const why = r === null ? 'node-gyp not found' : (r.stderr.split('\n').find((l) => /ERR!.*(error|Error)/.test(l)) ?? `exit ${r.status}`);
    console.log(`note: native/${name} was not built (${why.trim()}); its pure-JS fallback is used`);
  }
}
