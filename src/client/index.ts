/**
 * `ferry/client`: the typed QMP client, for scripts and tools that drive
 * Ferry or QEMU.
 *
 *   import { QmpConnection } from 'ferry/client';
 *   const src = await QmpConnection.connect('/run/src.qmp');
 *   await src.migrateSetCapabilities({ capabilities: [{ capability: 'events', state: true }] });
 *   await src.migrate({ uri: 'tcp:10.0.0.2:4444' });
 *   const done = await src.waitEvent('MIGRATION', { predicate: (e) => e.data.status === 'completed', timeoutMs: 60000 });
 *
 * The methods, argument and return types, events and error classes are
 * generated from qapi/ by tools/qapi-gen (src/generated/qapi-client.ts);
 * this module puts them over the socket client of src/qmp/client.ts.
 */
import { QmpApi, type QmpCallOptions, type QmpRawEvent, type QmpTransport } from '../generated/qapi-client.js';
import { QmpClient, QmpCommandError, type QmpConnectOptions, type QmpTarget } from '../qmp/client.js';
import type { QmpGreeting } from '../qmp/types.js';

export * from '../generated/qapi-client.js';
export type * from '../generated/qapi-types.js';
export { QmpClient, QmpCommandError, type QmpConnectOptions, type QmpTarget };

/** A QmpClient as the typed client's transport. */
export function transportOf(client: QmpClient): QmpTransport {
  return {
    execute: (command: string, args?: object, opts?: QmpCallOptions) => client.execute(command, args, opts),
    subscribe(listener: (ev: QmpRawEvent) => void) {
      client.events.on('event', listener);
      return () => void client.events.off('event', listener);
    },
    closed: client.closed,
  };
}

/** The typed client on one monitor connection. */
export class QmpConnection extends QmpApi {
  constructor(readonly raw: QmpClient) {
    super(transportOf(raw));
  }

  /** Connect to a monitor (a unix socket path, unix:PATH or tcp:HOST:PORT) and negotiate. */
  static async connect(target: QmpTarget, opts: QmpConnectOptions = {}): Promise<QmpConnection> {
    return new QmpConnection(await QmpClient.connect(target, { negotiate: true, ...opts }));
  }

  /** The server's greeting (its version). */
  get greeting(): QmpGreeting {
    return this.raw.greeting;
  }

  get isClosed(): boolean {
    return this.raw.isClosed;
  }

  /** Close the connection (commands still waiting reject). */
  close(): Promise<void> {
    return this.raw.close();
  }

  /** Drop the connection at once. */
  destroy(): void {
    this.raw.destroy();
  }
}
