/**
 * Where an NBD server is: a unix socket, a host and port, or (for a
 * server) a listening descriptor; and the URIs QEMU's tools accept for an
 * export: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH and the
 * legacy nbd:unix:PATH[:exportname=NAME] / nbd:HOST:PORT[:exportname=NAME].
 */
import { NBD_DEFAULT_PORT } from './protocol.js';

export type NbdAddress = { kind: 'unix'; path: string } | { kind: 'inet'; host: string; port: number } | { kind: 'fd'; fd: number };

export interface NbdTarget {
  address: NbdAddress;
  /** The export name ('' is the default export). */
  exportName: string;
}

export function describeAddress(a: NbdAddress): string {
  switch (a.kind) {
    case 'unix':
      return `unix:${a.path}`;
    case 'inet':
      return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
    case 'fd':
      return `fd:${a.fd}`;
  }
}

/** nbd://…, nbd+unix://… in QEMU's spelling (what qemu-img and qemu-io take). */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeURIComponent(t.exportName).replace(/%2F/g, '/');
  if (t.address.kind === 'unix') return `nbd+unix:///${name}?socket=${t.address.path}`;
  if (t.address.kind === 'inet') return `nbd://${describeAddress(t.address)}/${name}`;
  throw new Error('an NBD URI cannot name a descriptor');
}

function parsePort(p: string, what: string): number {
  if (!/^\d+$/.test(p) || Number(p) > 65535) throw new Error(`${what}: invalid port '${p}'`);
  return Number(p);
}

/** Parse an NBD URI or legacy filename; throws Error with the reason. */
export function parseNbdUri(s: string): NbdTarget {
  if (s.startsWith('nbd:') && !s.startsWith('nbd://')) {
    // legacy: nbd:unix:PATH[:exportname=NAME] or nbd:HOST:PORT[:exportname=NAME]
    let rest = s.slice(4);
    let exportName = '';
    const at = rest.indexOf(':exportname=');
    if (at >= 0) {
      exportName = rest.slice(at + ':exportname='.length);
      rest = rest.slice(0, at);
    }
    if (rest.startsWith('unix:')) return { address: { kind: 'unix', path: rest.slice(5) }, exportName };
    const colon = rest.lastIndexOf(':');
    if (colon < 0) throw new Error(`${s}: expected nbd:HOST:PORT or nbd:unix:PATH`);
    const host = rest.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
    return { address: { kind: 'inet', host, port: parsePort(rest.slice(colon + 1), s) }, exportName };
  }
  let url: URL;
  try {
    url = new URL(s);
  } catch {
    throw new Error(`${s}: not an NBD URI`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  switch (url.protocol) {
    case 'nbd:':
    case 'nbd+tcp:': {
      if (url.hostname === '') throw new Error(`${s}: no host`);
      const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
      return { address: { kind: 'inet', host, port: url.port === '' ? NBD_DEFAULT_PORT : parsePort(url.port, s) }, exportName };
    }
    case 'nbd+unix:': {
      const path = url.searchParams.get('socket');
      if (path === null || path === '') throw new Error(`${s}: nbd+unix needs ?socket=PATH`);
      if (url.hostname !== '') throw new Error(`${s}: nbd+unix takes no host`);
      return { address: { kind: 'unix', path }, exportName };
    }
    default:
      throw new Error(`${s}: not an NBD URI (nbd://, nbd+unix://)`);
  }
}
