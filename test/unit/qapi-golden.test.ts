// Golden tests: every bad schema under test/golden/qapi/NAME.json must be
// rejected with exactly the `file:line: message` stored in NAME.err.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { checkSchema } from '../../tools/qapi-gen/generate.js';
import { QapiSchemaError } from '../../tools/qapi-gen/errors.js';
import { fileURLToPath } from 'node:url';

// dist/test/unit/ -> repository root
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

const dir = path.join(repoRoot, 'test/golden/qapi');
const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort();

test('golden directory has cases', () => {
  assert.ok(files.filter((f) => fs.existsSync(path.join(dir, f.replace(/\.json$/, '.err')))).length >= 10);
});

for (const f of files) {
  const errFile = path.join(dir, f.replace(/\.json$/, '.err'));
  const expected = fs.existsSync(errFile) ? fs.readFileSync(errFile, 'utf8').trim() : undefined;
  test(`golden ${f}`, () => {
    let got: string | undefined;
    try {
      checkSchema(path.join(dir, f), { displayBase: dir });
    } catch (e) {
      if (!(e instanceof QapiSchemaError)) throw e;
      got = e.message;
    }
    assert.equal(got, expected, expected === undefined ? `${f} has no .err file, so it must be accepted` : undefined);
  });
}
