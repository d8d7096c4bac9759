/**
 * Migration URI parsing (QEMU syntax): tcp:HOST:PORT, tcp:[V6]:PORT,
 * unix:PATH, exec:COMMAND, fd:NAME. rdma: is recognised but not built.
 */
import { isIPv6 } from 'node:net';
import { ChannelError } from './errors.js';

export type MigrationUri =
  /**
   * host '' means "all interfaces" (incoming only: `tcp::PORT` and `tcp:0:PORT`).
   * IPv6 literals are stored without brackets. `family` comes from the
   * `,ipv4` / `,ipv6` address options.
   */
  | { kind: 'tcp'; host: string; port: number; family?: 4 | 6 }
  | { kind: 'unix'; path: string }
  | { kind: 'exec'; command: string }
  | { kind: 'fd'; name: string };

export type MigrationSide = 'outgoing' | 'incoming';

/** Linux sockaddr_un.sun_path holds 108 bytes including the terminating NUL. */
export const UNIX_PATH_MAX = 107;

/**
 * Parse a migration URI. Throws ChannelError with the text QEMU gives:
 * unknown scheme → (migrate) "Parameter 'uri' expects a valid migration
 * protocol", (migrate-incoming) "unknown migration protocol: URI".
 */
export function parseMigrationUri(uri: string, side: MigrationSide): MigrationUri {
  const colon = uri.indexOf(':');
  const scheme = colon < 0 ? '' : uri.slice(0, colon);
  const rest = colon < 0 ? '' : uri.slice(colon + 1);
  switch (scheme) {
    case 'tcp':
      return parseInet(rest, side);
    case 'unix':
      if (rest === '') throw new ChannelError('UNIX socket path must not be empty', 'EINVAL');
      if (Buffer.byteLength(rest) > UNIX_PATH_MAX) {
        throw new ChannelError(`UNIX socket path '${rest}' is too long`, 'ENAMETOOLONG');
      }
      return { kind: 'unix', path: rest };
    case 'exec':
      return { kind: 'exec', command: rest };
    case 'fd':
      if (rest === '') throw new ChannelError("File descriptor named '' has not been found", 'EBADF');
      return { kind: 'fd', name: rest };
    case 'rdma':
      throw new ChannelError('RDMA support is not available in this build', 'ENOTSUP');
    default:
      throw side === 'outgoing'
        ? new ChannelError("Parameter 'uri' expects a valid migration protocol", 'EINVAL')
        : new ChannelError(`unknown migration protocol: ${uri}`, 'EINVAL');
  }
}

/** QEMU's inet address syntax: HOST:PORT, [V6]:PORT, :PORT, then ",option"s. */
function parseInet(str: string, side: MigrationSide): MigrationUri {
  let host: string;
  let portText: string;
  let optText: string;
  if (str.startsWith('[')) {
    const m = /^\[([^\]]*)\]:([^,]*)(.*)$/.exec(str);
    if (m === null || !isIPv6(m[1]!)) throw new ChannelError(`error parsing IPv6 address '${str}'`, 'EINVAL');
    host = m[1]!;
    portText = m[2]!;
    optText = m[3]!;
  } else {
    const m = /^([^:,]*):([^,]*)(.*)$/.exec(str);
    if (m === null) throw new ChannelError(`error parsing address '${str}'`, 'EINVAL');
    host = m[1]!;
    portText = m[2]!;
    optText = m[3]!;
  }
  if (portText === '') throw new ChannelError(`error parsing address '${str}': port not specified`, 'EINVAL');
  if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) > 65535) {
    throw new ChannelError(`error parsing address '${str}': invalid port '${portText}'`, 'EINVAL');
  }
  const port = Number(portText);
  let family: 4 | 6 | undefined;
  if (optText !== '') {
    for (const opt of optText.slice(1).split(',')) {
      const [name, value = 'on'] = opt.split('=', 2) as [string, string?];
      if ((name === 'ipv4' || name === 'ipv6') && (value === 'on' || value === 'off')) {
        const f = name === 'ipv4' ? 4 : 6;
        if (value === 'on') family = f;
        else if (family === undefined) family = f === 4 ? 6 : 4;
      } else {
        throw new ChannelError(`error parsing address '${str}': unknown option '${opt}'`, 'EINVAL');
      }
    }
  }
  if (side === 'outgoing') {
    if (host === '') throw new ChannelError('host and/or port not specified', 'EINVAL');
    if (port === 0) throw new ChannelError(`error parsing address '${str}': invalid port '0'`, 'EINVAL');
  } else if (host === '0') {
    host = ''; // tcp:0:PORT listens on every address, IPv4 and IPv6
  }
  const out: MigrationUri = { kind: 'tcp', host, port };
  if (family !== undefined) out.family = family;
  return out;
}

/** Canonical text form, e.g. for describe() and error messages. */
export function formatMigrationUri(uri: MigrationUri): string {
  switch (uri.kind) {
    case 'tcp':
      return `tcp:${formatHostPort(uri.host, uri.port)}`;
    case 'unix':
      return `unix:${uri.path}`;
    case 'exec':
      return `exec:${uri.command}`;
    case 'fd':
      return `fd:${uri.name}`;
  }
}

export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}
