/**
 * The QMP command handlers. Each is thin: arguments arrive validated by the
 * generated code, the work happens in machine/ and migration/, and errors
 * come back as QmpError (engine errors are GenericError).
 */
import { writeFileSync } from 'node:fs';
import { closeSync } from 'node:fs';
import type { CommandHandlers } from '../generated/qapi-commands.js';
import { QMP_SCHEMA } from '../generated/qapi-introspect.js';
import { QmpError } from '../qapi/errors.js';
import { saveDevicesOnly } from '../migration/index.js';
import type { Ctx } from './context.js';
import { generic } from './errors.js';
import { addObject, deleteObject } from './objects.js';
import { blockDigest, blockInfo, diskWorkloadInfo } from './block.js';
import { observeHandlers } from './observe.js';
import { coloHandlers } from './colo.js';


function migrationInfo(ctx: Ctx) {
  const { source, destination } = ctx.vm;
  if (source.status !== 'none') return source.info();
  return destination.info();
}

export const handlers: CommandHandlers<Ctx> = {
  // ---- control
  qmp_capabilities() {
    // negotiation is handled by the monitor; in command mode it never gets here
  },
  'query-version'(_args, ctx) {
    return ctx.vm.version;
  },
  'query-commands'(_args, ctx) {
    return ctx.vm.commandNames.map((name) => ({ name }));
  },
  'query-qmp-schema'() {
    return QMP_SCHEMA as never;
  },
  quit(_args, ctx) {
    ctx.vm.requestQuit();
  },

  // ---- run state
  'query-status'(_args, ctx) {
    const status = ctx.vm.machine.runState;
    return { status, running: status === 'running', singlestep: false };
  },
  async stop(_args, ctx) {
    const m = ctx.vm.machine;
    if (m.runState === 'inmigrate') {
      // like QEMU: the guest will not start when the incoming migration ends
      ctx.vm.autostart = false;
      return;
    }
    if (m.runState !== 'running') return;
    await generic(() => m.stop('paused'));
  },
  async cont(_args, ctx) {
    const m = ctx.vm.machine;
    switch (m.runState) {
      case 'inmigrate':
        ctx.vm.autostart = true;
        return;
      case 'internal-error':
      case 'shutdown':
        throw new QmpError('GenericError', 'Resetting the Virtual Machine is required');
      case 'finish-migrate':
        throw new QmpError('GenericError', 'Migration is not finished yet');
      default:
        await generic(() => m.start());
    }
  },

  // ---- objects
  'object-add'(args, ctx) {
    const { 'qom-type': qomType, id, ...props } = args as { 'qom-type': string; id: string } & Record<string, unknown>;
    addObject(ctx.vm.objects, { qomType, id, props });
  },
  'object-del'(args, ctx) {
    const vm = ctx.vm;
    // credentials stay while a migration on either side may still use them
    const migrating = vm.source.isActive() || ['setup', 'active', 'postcopy-active'].includes(vm.destination.status);
    deleteObject(vm.objects, args.id, (id) => migrating && vm.options.get('tls-creds') === id);
  },

  // ---- descriptors and memory
  getfd(args, ctx) {
    const fd = ctx.conn.takeFd();
    if (fd === undefined) throw new QmpError('GenericError', 'No file descriptor supplied via SCM_RIGHTS');
    if (/^[0-9]/.test(args.fdname)) {
      closeSync(fd);
      throw new QmpError('GenericError', "Parameter 'fdname' expects a name not starting with a digit");
    }
    const old = ctx.vm.fds.get(args.fdname);
    if (old !== undefined) closeSync(old);
    ctx.vm.fds.set(args.fdname, fd);
  },
  closefd(args, ctx) {
    const fd = ctx.vm.fds.get(args.fdname);
    if (fd === undefined) throw new QmpError('GenericError', `File descriptor named '${args.fdname}' not found`);
    ctx.vm.fds.delete(args.fdname);
    closeSync(fd);
  },
  async pmemsave(args, ctx) {
    await generic(() => ctx.vm.machine.pmemsave(args.val, args.size, args.filename));
  },
  async 'x-query-memory-digest'(_args, ctx) {
    return generic(() => ctx.vm.machine.digest());
  },
  'x-query-workload'(_args, ctx) {
    return ctx.vm.machine.workloadInfo().map((v) => ({
      'cpu-index': v.cpuIndex,
      steps: v.steps,
      sum: v.sum,
      blocked: v.blocked,
    }));
  },
  'x-query-disk-workload'(_args, ctx) {
    return ctx.vm.machine.diskWorkloadInfo().map(diskWorkloadInfo);
  },
  async 'x-query-block-digest'(_args, ctx) {
    return blockDigest(await generic(() => ctx.vm.machine.blockDigest()));
  },

  // ---- block
  async 'query-block'(_args, ctx) {
    return (await generic(() => ctx.vm.machine.blockInfo())).map(blockInfo);
  },

  // ---- NBD server
  'nbd-server-start'(args, ctx) {
    return ctx.vm.nbd.start(ctx.vm, args, ctx.vm.log);
  },
  'nbd-server-add'(args, ctx) {
    ctx.vm.nbd.add(ctx.vm, args);
  },
  'nbd-server-remove'(args, ctx) {
    return ctx.vm.nbd.remove(args.name, args.mode);
  },
  'nbd-server-stop'(_args, ctx) {
    return ctx.vm.nbd.stop();
  },

  'x-query-page-faults'(_args, ctx) {
    const { faults, latenciesUs } = ctx.vm.machine.faultStats();
    const s = Float64Array.from(latenciesUs).sort();
    const pct = (q: number): number => (s.length === 0 ? 0 : s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!);
    return { faults, 'p50-us': pct(0.5), 'p99-us': pct(0.99), 'max-us': pct(1), samples: s.length };
  },

  // ---- migration
  'query-migrate'(_args, ctx) {
    return migrationInfo(ctx);
  },
  'migrate-set-capabilities'(args, ctx) {
    const { source, options } = ctx.vm;
    // in colo too, as later QEMU does (7.2 let x-colo go off under a running COLO)
    if (source.isActive() || source.status === 'cancelling' || source.status === 'colo') {
      throw new QmpError('GenericError', "There's a migration process in progress");
    }
    return generic(() => options.setCapabilities(args.capabilities));
  },
  'query-migrate-capabilities'(_args, ctx) {
    return ctx.vm.options.capabilityList();
  },
  async 'migrate-set-parameters'(args, ctx) {
    await generic(() => ctx.vm.options.setParameters(args));
    ctx.vm.source.applyMaxBandwidth();
    if (args['x-checkpoint-delay'] !== undefined) ctx.vm.colo.checkpointDelayChanged();
  },
  'query-migrate-parameters'(_args, ctx) {
    return ctx.vm.options.parameters();
  },
  client_migrate_info(args) {
    if (args.protocol !== 'spice') {
      throw new QmpError('GenericError', "Parameter 'protocol' expects 'spice'");
    }
    throw new QmpError('DeviceNotActive', 'SPICE is not in use');
  },
  'migrate-start-postcopy'(_args, ctx) {
    if (!ctx.vm.options.capability('postcopy-ram')) {
      throw new QmpError(
        'GenericError',
        'Enable postcopy with migrate_set_capability before the start of migration',
      );
    }
    if (ctx.vm.source.status === 'none') {
      throw new QmpError('GenericError', 'Postcopy must be started after migration has been started');
    }
    // also after the migration ended or when already requested: {} (docs/spec/qmp.md B.9)
    ctx.vm.source.requestPostcopy();
  },
  migrate_cancel(_args, ctx) {
    ctx.vm.source.cancel();
  },
  async migrate_set_downtime(args, ctx) {
    if (!(args.value >= 0 && args.value <= 2000)) {
      throw new QmpError(
        'GenericError',
        "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds",
      );
    }
    await generic(() => ctx.vm.options.setParameters({ 'downtime-limit': Math.trunc(args.value * 1000) }));
  },
  async migrate_set_speed(args, ctx) {
    await generic(() => ctx.vm.options.setParameters({ 'max-bandwidth': args.value }));
    ctx.vm.source.applyMaxBandwidth();
  },
  'migrate-set-cache-size'(args, ctx) {
    return generic(() => {
      const size = ctx.vm.options.setXbzrleCacheSize(args.value, ctx.vm.machine.ramSize);
      ctx.vm.source.resizeXbzrleCache(size);
    });
  },
  'query-migrate-cache-size'(_args, ctx) {
    return ctx.vm.options.xbzrleCacheSize();
  },
  migrate(args, ctx) {
    // a COLO secondary's guest is the primary's copy, not a guest to migrate
    if (ctx.vm.destination.status === 'colo') throw new QmpError('GenericError', "There's a migration process in progress");
    return generic(() => ctx.vm.source.start(args.uri, { blk: args.blk, inc: args.inc }));
  },
  async 'migrate-incoming'(args, ctx) {
    const vm = ctx.vm;
    if (vm.incomingMode !== 'defer') {
      throw new QmpError('GenericError', "For use with '-incoming defer'");
    }
    await generic(() => vm.destination.start(args.uri));
  },

  ...observeHandlers,

  // ---- Xen and COLO replication
  async 'xen-save-devices-state'(args, ctx) {
    const m = ctx.vm.machine;
    await generic(async () => {
      const wasRunning = m.runState === 'running';
      if (wasRunning) await m.stop('paused');
      try {
        m.savedRunStateForMigration = 'running';
        const bytes = saveDevicesOnly(m.devices);
        writeFileSync(args.filename, bytes);
      } finally {
        m.savedRunStateForMigration = undefined;
        if (wasRunning) await m.start();
      }
    });
  },
  async 'xen-set-replication'(args, ctx) {
    if (args.enable && args.failover !== undefined) {
      throw new QmpError('GenericError', "Parameter 'failover' is only for stopping replication");
    }
    const r = ctx.vm.machine.replication;
    if (args.enable) await generic(() => r.startAll(args.primary ? 'primary' : 'secondary'));
    // a failover stop reports nothing, as QEMU's (the status query tells)
    else if (args.failover === true) await r.stopAll(true).catch((e: unknown) => ctx.vm.log(`replication failover: ${(e as Error).message}`));
    else await generic(() => r.stopAll(false));
  },
  'query-xen-replication-status'(_args, ctx) {
    const desc = ctx.vm.machine.replication.getErrorAll();
    return desc === null ? { error: false } : { error: true, desc };
  },
  async 'xen-colo-do-checkpoint'(_args, ctx) {
    await generic(() => ctx.vm.machine.replication.checkpointAll());
  },

  ...coloHandlers,
};
