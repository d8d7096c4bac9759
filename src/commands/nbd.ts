/**
 * nbd-server-start, nbd-server-add, nbd-server-remove, nbd-server-stop:
 * the VM's one NBD server (src/nbd/), exporting drives by their block
 * backend name, with QEMU 7.2's checks in its order and its texts.
 * An export reads and writes through the Drive (machine/drives.ts), so
 * that cache modes, the dirty-chunk log and block replication's
 * copy-before-write see every write a client makes.
 */
import type { Drive } from '../machine/index.js';
import { NbdServer, NbdServerError, NBD_MAX_STRING_SIZE, type NbdAddress, type NbdExportTarget } from '../nbd/index.js';
import { imageAllocation } from '../nbd/target.js';
import type * as T from '../generated/qapi-types.js';
import { QmpError } from '../qapi/errors.js';
import type { VmServices } from './context.js';

const generic = (msg: string) => new QmpError('GenericError', msg);

/** A drive as an export target. */
export function driveTarget(d: Drive): NbdExportTarget {
  return {
    get size() {
      return d.size;
    },
    read: (o, b) => d.read(o, b),
    write: (o, b) => d.write(o, b),
    writeZeroes: (o, n) => d.writeZeroes(o, n),
    flush: () => d.flush(),
    allocation: (o, n) => imageAllocation(d.image, o, n),
  };
}

/** QEMU's id_wellformed (block export ids). */
const ID_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

export class NbdService {
  private server: NbdServer | null = null;
  /** Set while nbd-server-start is listening, so that a second start is refused at once. */
  private starting = false;
  /** The drive behind each export. */
  private readonly exportDrives = new Map<string, string>();

  get running(): NbdServer | null {
    return this.server;
  }

  async start(vm: VmServices, args: { addr: T.SocketAddressLegacy; 'tls-creds'?: string; 'tls-authz'?: string; 'max-connections'?: number }, log: (m: string) => void): Promise<void> {
    if (this.server !== null || this.starting) throw generic('NBD server already running');
    let addr: NbdAddress;
    const a = args.addr;
    switch (a.type) {
      case 'unix':
        addr = { kind: 'unix', path: a.data.path };
        break;
      case 'inet': {
        const port = a.data.port;
        if (!/^\d+$/.test(port) || Number(port) > 65535) {
          throw generic(`address resolution failed for ${a.data.host}:${port}: Servname not supported for ai_socktype`);
        }
        addr = { kind: 'inet', host: a.data.host, port: Number(port) };
        break;
      }
      case 'fd': {
        const fd = vm.fds.get(a.data.str);
        if (fd === undefined) throw generic(`File descriptor named '${a.data.str}' has not been found`);
        vm.fds.delete(a.data.str); // the listener takes it over
        addr = { kind: 'fd', fd };
        break;
      }
    }
    const creds = args['tls-creds'];
    if (creds !== undefined) {
      const o = vm.objects.get(creds);
      if (o === undefined) throw generic(`No TLS credentials with id '${creds}'`);
      if (o.tls === undefined) throw generic(`Object with id '${creds}' is not TLS credentials`);
      throw generic('TLS for the NBD server is not supported by this build yet');
    }
    if (args['tls-authz'] !== undefined) throw generic("'tls-authz' is only supported with 'tls-creds'");
    this.starting = true;
    try {
      const s = await NbdServer.listen(addr, { maxConnections: args['max-connections'] ?? 0 });
      s.on('client-error', (e: Error) => log(`nbd: ${e.message}`));
      // a client gone without NBD_CMD_DISC: block replication's primary may be gone
      s.on('client-closed', (name: string | null, clean: boolean) => {
        const drive = name === null ? undefined : this.exportDrives.get(name);
        if (drive !== undefined && !clean) vm.machine.replicationPeerLost(drive, `a client of export '${name}' went away without NBD_CMD_DISC`);
      });
      this.server = s;
    } catch (e) {
      if (e instanceof NbdServerError) throw generic(e.message);
      throw e;
    } finally {
      this.starting = false;
    }
  }

  add(vm: VmServices, o: T.NbdServerAddOptions): void {
    const drive = vm.machine.drives.get(o.device);
    if (drive === undefined) throw generic(`Cannot find device='${o.device}' nor node-name='${o.device}'`);
    if (this.server === null) throw generic('NBD server not running');
    const name = o.name ?? o.device;
    if (!ID_RE.test(name)) throw generic('Invalid block export id');
    if (this.server.getExport(name) !== undefined) throw generic(`Block export id '${name}' is already in use`);
    if (Buffer.byteLength(name) > NBD_MAX_STRING_SIZE) throw generic(`export name '${name}' too long`);
    if (o.description !== undefined && Buffer.byteLength(o.description) > NBD_MAX_STRING_SIZE) {
      throw generic(`description '${o.description}' too long`);
    }
    if (o.bitmap !== undefined) throw generic(`Bitmap '${o.bitmap}' is not found (Ferry keeps no dirty bitmaps)`);
    // nbd-server-add downgrades a read-only drive's export silently, as QEMU does
    const writable = (o.writable ?? false) && !drive.readOnly;
    this.server.addExport(name, driveTarget(drive), { writable, ...(o.description !== undefined ? { description: o.description } : {}) });
    this.exportDrives.set(name, drive.name);
  }

  async remove(name: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    if (this.server === null) throw generic(`Export '${name}' is not found`);
    try {
      await this.server.removeExport(name, mode);
      this.exportDrives.delete(name);
    } catch (e) {
      if (e instanceof NbdServerError) throw generic(e.message);
      throw e;
    }
  }

  async stop(): Promise<void> {
    const s = this.server;
    if (s === null) throw generic('NBD server not running');
    this.server = null;
    this.exportDrives.clear();
    await s.close();
  }

  /** Stop if running (the VM quits). */
  async shutdown(): Promise<void> {
    if (this.server !== null) await this.stop();
  }
}
