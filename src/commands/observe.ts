/**
 * The handlers of the observation commands: calc-dirty-rate and
 * query-dirty-rate (QEMU 5.2+), and Ferry's x-query-migrate-forecast,
 * x-query-migrate-decisions, x-trace-migration and
 * x-query-migration-trace. The work is in src/migration/observe/.
 */
import type { CommandHandlers } from '../generated/qapi-commands.js';
import type { Ctx } from './context.js';
import { generic } from './errors.js';

type ObserveCommands =
  | 'calc-dirty-rate'
  | 'query-dirty-rate'
  | 'x-query-migrate-forecast'
  | 'x-query-migrate-decisions'
  | 'x-trace-migration'
  | 'x-query-migration-trace';

export const observeHandlers: Pick<CommandHandlers<Ctx>, ObserveCommands> = {
  'calc-dirty-rate'(args, ctx) {
    const ms = args['calc-time-unit'] === 'millisecond' ? args['calc-time'] : args['calc-time'] * 1000;
    return generic(() => ctx.vm.observe.calcDirtyRate({ calcTimeMs: ms, samplePages: args['sample-pages'], mode: args.mode }));
  },
  'query-dirty-rate'(args, ctx) {
    return ctx.vm.observe.queryDirtyRate(args['calc-time-unit']);
  },
  'x-query-migrate-forecast'(args, ctx) {
    return generic(() => ctx.vm.observe.forecast(args.bandwidth));
  },
  'x-query-migrate-decisions'(_args, ctx) {
    return ctx.vm.observe.decisions();
  },
  'x-trace-migration'(args, ctx) {
    return generic(() => ctx.vm.observe.setTracing(args.enable, args.interval));
  },
  'x-query-migration-trace'(_args, ctx) {
    return generic(() => ctx.vm.observe.trace());
  },
};
