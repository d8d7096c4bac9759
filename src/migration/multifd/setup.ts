/**
 * Setting up `multifd` for one migration (docs/spec/multifd.md): what it
 * needs, and the source's extra connections.
 */
import { multifdNative } from '../../base/native.js';
import type { RamBlock } from '../../machine/types.js';
import { connectExtraSocket, type MigrationUri } from '../channel/index.js';
import type { MigrationOptions } from '../core/options.js';
import { MigrationError } from '../errors.js';
import { MultifdSender } from './sender.js';
import type { MultifdWorkers } from './workers.js';

/** The VM's UUID as multifd's initial packet carries it: Ferry has no -uuid, so QEMU's default, all zeros. */
export const NO_UUID = new Uint8Array(16);

/** Throws when this migration cannot use multifd (a transport without extra connections, TLS, COLO, no native code). */
export function checkMultifd(options: MigrationOptions, socketTransport: boolean): void {
  if (!socketTransport) throw new MigrationError('multifd is not supported by current protocol');
  if (options.get('tls-creds') !== '') {
    throw new MigrationError('multifd: Ferry does not run multifd channels under TLS yet; turn off multifd or tls-creds');
  }
  if (options.capability('x-colo')) {
    throw new MigrationError('multifd: Ferry does not run COLO checkpoints over multifd channels; turn off multifd or x-colo');
  }
  if (multifdNative === null) throw new MigrationError('multifd: this build has no native/pages addon, which multifd needs');
}

/** The source's channels: multifd-channels connections to the main channel's address, each with its worker. */
export async function openMultifd(
  uri: MigrationUri,
  options: MigrationOptions,
  blocks: readonly RamBlock[],
  signal: AbortSignal,
  pool: MultifdWorkers,
  onFailure: (e: Error) => void,
): Promise<MultifdSender> {
  checkMultifd(options, uri.kind === 'tcp' || uri.kind === 'unix');
  const n = options.get('multifd-channels');
  const target = uri as MigrationUri & { kind: 'tcp' | 'unix' };
  const settled = await Promise.allSettled(Array.from({ length: n }, () => connectExtraSocket(target, signal)));
  const failed = settled.find((r) => r.status === 'rejected');
  if (failed !== undefined) {
    for (const r of settled) if (r.status === 'fulfilled') r.value.destroy();
    throw (failed as PromiseRejectedResult).reason;
  }
  const sockets = settled.map((r) => (r as PromiseFulfilledResult<import('node:net').Socket>).value);
  return new MultifdSender(sockets, blocks, NO_UUID, pool, onFailure);
}
