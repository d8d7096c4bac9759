/**
 * Monitor address parsing: QEMU chardev-style specs for the server
 * (`unix:PATH,server=on,wait=off`, `tcp:HOST:PORT,server=on,wait=off`) and
 * plain targets for the client (`/path`, `unix:/path`, `tcp:HOST:PORT`).
 */

export type QmpAddress =
  | { kind: 'unix'; path: string }
  | { kind: 'tcp'; host: string; port: number };

export interface QmpListenSpec {
  address: QmpAddress;
  /** wait=on: listen() resolves only once the first client has connected */
  wait: boolean;
}

export class QmpAddressError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QmpAddressError';
  }
}

/** Split on single commas; ",," is an escaped comma (QEMU option syntax). */
function splitOpts(s: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c === ',') {
      if (s[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      out.push(cur);
      cur = '';
      continue;
    }
    cur += c;
  }
  out.push(cur);
  return out;
}

function parseBool(spec: string, key: string, v: string | undefined): boolean {
  if (v === undefined) return true;
  switch (v) {
    case 'on': case 'yes': case 'true': return true;
    case 'off': case 'no': case 'false': return false;
  }
  throw new QmpAddressError(`invalid monitor address '${spec}': parameter '${key}' expects 'on' or 'off'`);
}

/** Parse HOST:PORT (HOST may be `[v6]`, empty = all interfaces). */
export function parseHostPort(spec: string, hp: string): { host: string; port: number } {
  let host: string;
  let portStr: string;
  if (hp.startsWith('[')) {
    const end = hp.indexOf(']');
    if (end < 0 || hp[end + 1] !== ':') {
      throw new QmpAddressError(`invalid address '${spec}': expected [IPV6]:PORT`);
    }
    host = hp.slice(1, end);
    portStr = hp.slice(end + 2);
  } else {
    const colon = hp.lastIndexOf(':');
    if (colon < 0) throw new QmpAddressError(`invalid address '${spec}': expected HOST:PORT`);
    host = hp.slice(0, colon);
    portStr = hp.slice(colon + 1);
    if (host.includes(':')) {
      throw new QmpAddressError(`invalid address '${spec}': write IPv6 hosts in brackets, e.g. tcp:[::1]:4444`);
    }
  }
  if (!/^\d+$/.test(portStr) || Number(portStr) > 65535) {
    throw new QmpAddressError(`invalid address '${spec}': port '${portStr}' is not a number in 0..65535`);
  }
  return { host, port: Number(portStr) };
}

/** Parse a monitor listen spec (`unix:...`/`tcp:...` with server options). */
export function parseListenSpec(spec: string): QmpListenSpec {
  const m = /^(unix|tcp):(.*)$/s.exec(spec);
  if (!m) {
    throw new QmpAddressError(
      `invalid monitor address '${spec}': expected unix:PATH,server=on,wait=off or tcp:HOST:PORT,server=on,wait=off`,
    );
  }
  const kind = m[1] as 'unix' | 'tcp';
  const [target, ...opts] = splitOpts(m[2]!);
  let server = false;
  let wait = true;
  for (const o of opts) {
    if (o === '') continue;
    const eq = o.indexOf('=');
    const key = eq < 0 ? o : o.slice(0, eq);
    const val = eq < 0 ? undefined : o.slice(eq + 1);
    switch (key) {
      case 'server': server = parseBool(spec, key, val); break;
      case 'wait': wait = parseBool(spec, key, val); break;
      case 'nowait':
        if (val !== undefined) throw new QmpAddressError(`invalid monitor address '${spec}': 'nowait' takes no value`);
        wait = false;
        break;
      case 'nodelay': case 'id': case 'ipv4': case 'ipv6':
        break; // accepted, no effect here
      default:
        throw new QmpAddressError(`invalid monitor address '${spec}': unknown parameter '${key}'`);
    }
  }
  if (!server) {
    throw new QmpAddressError(`invalid monitor address '${spec}': the monitor must be a server (add server=on,wait=off)`);
  }
  if (kind === 'unix') {
    if (!target) throw new QmpAddressError(`invalid monitor address '${spec}': empty socket path`);
    return { address: { kind, path: target }, wait };
  }
  const { host, port } = parseHostPort(spec, target!);
  return { address: { kind, host, port }, wait };
}

/** Parse a client target: a path, `unix:PATH`, or `tcp:HOST:PORT`. */
export function parseClientTarget(target: string): QmpAddress {
  if (target.startsWith('tcp:')) {
    const { host, port } = parseHostPort(target, splitOpts(target.slice(4))[0]!);
    if (port === 0) throw new QmpAddressError(`invalid address '${target}': port 0`);
    return { kind: 'tcp', host: host || 'localhost', port };
  }
  if (target.startsWith('unix:')) {
    const path = splitOpts(target.slice(5))[0]!;
    if (!path) throw new QmpAddressError(`invalid address '${target}': empty socket path`);
    return { kind: 'unix', path };
  }
  if (!target) throw new QmpAddressError('empty QMP socket address');
  return { kind: 'unix', path: target };
}
