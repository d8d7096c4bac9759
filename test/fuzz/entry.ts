/** What Jazzer.js loads: the target named by FERRY_FUZZ_TARGET (targets.ts). */
import { TARGETS } from './targets.js';

// (`node --test dist/test/` loads every file under test/: without the variable this does nothing)
const name = process.env.FERRY_FUZZ_TARGET;
const target = TARGETS.find((t) => t.name === name);
if (name !== undefined && !target) throw new Error(`FERRY_FUZZ_TARGET=${name}: not one of ${TARGETS.map((t) => t.name).join(', ')}`);

export const fuzz = target?.run ?? ((): void => undefined);
