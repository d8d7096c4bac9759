/**
 * What every command handler sees: the VM's services and the monitor
 * connection that issued the command.
 */
import type { Machine } from '../machine/machine.js';
import type { ColoService, MigrationDestination, MigrationObserver, MigrationOptions, MigrationSource } from '../migration/index.js';
import type { QmpClientConn } from '../qmp/index.js';
import type { NbdService } from './nbd.js';

export interface UserObject {
  qomType: string;
  id: string;
  props: Record<string, unknown>;
  tls?: import('../crypto/tls-creds.js').TlsCreds;
}

export interface VmServices {
  readonly machine: Machine;
  readonly options: MigrationOptions;
  readonly source: MigrationSource;
  readonly destination: MigrationDestination;
  /** Dirty rate, forecast, decisions and traces of this VM's migrations. */
  readonly observe: MigrationObserver;
  /** COLO on this VM (its primary or secondary session, settings, status). */
  readonly colo: ColoService;
  /** How -incoming was given: not at all, `defer`, or a URI. */
  readonly incomingMode: 'none' | 'defer' | 'uri';
  /** Objects created by -object and object-add, by id. */
  readonly objects: Map<string, UserObject>;
  /** The NBD server (nbd-server-start ...). */
  readonly nbd: NbdService;
  /** Logs a line on stderr ("ferry: ..."). */
  log(msg: string): void;
  /** Descriptors received with getfd, by name. */
  readonly fds: Map<string, number>;
  /** Names of every command in the schema (query-commands). */
  readonly commandNames: readonly string[];
  /** Greeting / query-version value. */
  readonly version: { qemu: { major: number; minor: number; micro: number }; package: string };
  /** Whether the guest starts when an incoming migration completes (no -S). */
  autostart: boolean;
  /** Ends the process after the reply has been written. */
  requestQuit(): void;
}

export interface Ctx {
  vm: VmServices;
  conn: QmpClientConn;
}
