/**
 * The COLO commands (qapi/colo.json, x-colo-lost-heartbeat of
 * qapi/migration.json): thin, the work is in src/migration/colo/.
 */
import type { CommandHandlers } from '../generated/qapi-commands.js';
import type { Ctx } from './context.js';
import { generic } from './errors.js';

type ColoCommands = 'x-colo-lost-heartbeat' | 'query-colo-status' | 'x-colo-set-parameters' | 'x-query-colo-parameters';

export const coloHandlers: Pick<CommandHandlers<Ctx>, ColoCommands> = {
  'x-colo-lost-heartbeat'(_args, ctx) {
    return generic(() => ctx.vm.colo.lostHeartbeat());
  },
  'query-colo-status'(_args, ctx) {
    return ctx.vm.colo.status();
  },
  'x-colo-set-parameters'(args, ctx) {
    return generic(() => ctx.vm.colo.parameters.set(args));
  },
  'x-query-colo-parameters'(_args, ctx) {
    return { ...ctx.vm.colo.parameters.get() };
  },
};
