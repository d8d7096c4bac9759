/**
 * The transports: outgoing connects and incoming listeners for tcp:, unix:,
 * exec: and fd:.
 */
import * as net from 'node:net';
import * as fs from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { resolve as pathResolve } from 'node:path';
import { ChannelError, errorCode, strerror, sysError } from './errors.js';
import { StreamChannel, discardWritable, endedReadable, killTree, type Channel } from './channel.js';
import { formatHostPort, type MigrationUri } from './uri.js';
import { armLiveness } from './liveness.js';

export interface ConnectOptions {
  /** The descriptor registered with getfd under this name (taken over: the channel closes it). */
  lookupFd(name: string): number | undefined;
  /** migrate_cancel during setup: aborts a pending connect (rejects with code 'ABORT_ERR'). */
  signal?: AbortSignal;
}

export interface ListenOptions {
  lookupFd(name: string): number | undefined;
  /**
   * tcp:/unix: how many more connections to take after the first one
   * (multifd channels), asked when the first one arrives. Default 0.
   */
  extraConnections?(): number;
}

export type ListenAddress = { host: string; port: number } | { path: string };

export interface IncomingListener {
  /** The first connection (exec:/fd: — the channel itself). Only one: later calls reject. */
  accept(): Promise<Channel>;
  /** The bound address (real port for tcp:HOST:0); undefined for exec:/fd:. */
  address(): ListenAddress | undefined;
  /**
   * The extra connections that followed the first (ListenOptions
   * extraConnections), as bare sockets that nobody reads (their descriptors
   * are read directly): resolves once all have arrived, rejects when the
   * listener closes first. exec:/fd: have none.
   */
  acceptExtra?(): Promise<net.Socket[]>;
  /** Stops listening; rejects a pending accept(); closes a connection nobody took. Idempotent. */
  close(): void;
  describe(): string;
}

function abortError(): ChannelError {
  return new ChannelError('Migration connection cancelled', 'ABORT_ERR');
}

function isResolveError(err: unknown): boolean {
  const e = err as { syscall?: string };
  const code = errorCode(err);
  return e.syscall === 'getaddrinfo' || code === 'ENOTFOUND' || (code !== undefined && code.startsWith('EAI_'));
}

// ---------------------------------------------------------------- outgoing

export async function connectOutgoing(uri: MigrationUri, opts: ConnectOptions): Promise<Channel> {
  if (opts.signal?.aborted) throw abortError();
  switch (uri.kind) {
    case 'tcp': {
      const shown = `${uri.host}:${uri.port}`; // QEMU prints "'%s:%s'", host as given
      const connectOpts: net.NetConnectOpts = { host: uri.host, port: uri.port, allowHalfOpen: true, noDelay: true };
      if (uri.family !== undefined) connectOpts.family = uri.family;
      return connectSocket(connectOpts, opts.signal, (err) =>
        isResolveError(err)
          ? new ChannelError(`address resolution failed for ${shown}: ${strerror(err)}`, errorCode(err), { cause: err })
          : sysError(`Failed to connect to '${shown}'`, err),
        (s) => `tcp:${formatHostPort(uri.host, uri.port)} (local ${formatHostPort(s.localAddress ?? '?', s.localPort ?? 0)})`,
      );
    }
    case 'unix':
      return connectSocket({ path: uri.path, allowHalfOpen: true }, opts.signal,
        (err) => sysError(`Failed to connect to '${uri.path}'`, err),
        () => `unix:${uri.path}`);
    case 'exec':
      return spawnExec(uri.command, 'outgoing', opts.signal);
    case 'fd':
      return openFd(uri.name, 'outgoing', opts.lookupFd);
  }
}

function connectSocket(
  connectOpts: net.NetConnectOpts,
  signal: AbortSignal | undefined,
  mapError: (err: unknown) => ChannelError,
  describe: (s: net.Socket) => string,
): Promise<Channel> {
  return openSocket(connectOpts, signal, mapError).then((sock) => new StreamChannel({
    input: sock, output: sock, bidirectional: true, ioKind: 'socket',
    resources: [sock], describe: () => describe(sock),
  }));
}

function openSocket(
  connectOpts: net.NetConnectOpts,
  signal: AbortSignal | undefined,
  mapError: (err: unknown) => ChannelError,
): Promise<net.Socket> {
  return new Promise<net.Socket>((resolve, reject) => {
    let sock: net.Socket;
    try {
      sock = net.connect(connectOpts);
    } catch (err) {
      reject(mapError(err));
      return;
    }
    const done = (): void => {
      sock.off('error', onError);
      sock.off('connect', onConnect);
      signal?.removeEventListener('abort', onAbort);
    };
    const onError = (err: Error): void => {
      done();
      sock.on('error', () => {});
      sock.destroy();
      reject(mapError(err));
    };
    const onConnect = (): void => {
      done();
      if (!('path' in connectOpts)) {
        sock.setNoDelay(true);
        armLiveness(sock);
      }
      resolve(sock);
    };
    const onAbort = (): void => {
      done();
      sock.on('error', () => {});
      sock.destroy();
      reject(abortError());
    };
    sock.on('error', onError);
    sock.once('connect', onConnect);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Another connection to a tcp: or unix: destination, as a bare socket
 * (multifd channels: their workers do the I/O on its descriptor).
 */
export function connectExtraSocket(uri: MigrationUri & { kind: 'tcp' | 'unix' }, signal?: AbortSignal): Promise<net.Socket> {
  if (signal?.aborted) return Promise.reject(abortError());
  if (uri.kind === 'unix') {
    return openSocket({ path: uri.path, allowHalfOpen: true }, signal, (err) => sysError(`Failed to connect to '${uri.path}'`, err));
  }
  const connectOpts: net.NetConnectOpts = { host: uri.host, port: uri.port, allowHalfOpen: true, noDelay: true };
  if (uri.family !== undefined) connectOpts.family = uri.family;
  return openSocket(connectOpts, signal, (err) => sysError(`Failed to connect to '${uri.host}:${uri.port}'`, err));
}

// ---------------------------------------------------------------- exec

function spawnExec(command: string, side: 'outgoing' | 'incoming', signal?: AbortSignal): Promise<Channel> {
  return new Promise<Channel>((resolve, reject) => {
    let child: ChildProcess;
    try {
      // stderr is shared with us, like QEMU's exec: migration. detached: the
      // command gets its own process group, so close() can end all of it.
      child = spawn('/bin/sh', ['-c', command], { stdio: ['pipe', 'pipe', 'inherit'], detached: true });
    } catch (err) {
      reject(sysError(`Unable to execute command '${command}'`, err));
      return;
    }
    const stdin = child.stdin!;
    const stdout = child.stdout!;
    const quiet = (): void => {};
    const done = (): void => {
      child.off('spawn', onSpawn);
      child.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
    };
    const kill = (): void => {
      child.on('error', quiet);
      stdin.on('error', quiet);
      stdout.on('error', quiet);
      stdin.destroy();
      stdout.destroy();
      if (child.exitCode === null && child.signalCode === null) killTree(child, 'SIGTERM');
    };
    const onSpawn = (): void => {
      done();
      resolve(new StreamChannel({
        input: stdout,
        output: stdin,
        bidirectional: true,
        endOnLastByte: true,
        ioKind: 'command',
        resources: [stdin, stdout],
        child,
        describe: () => `exec:${command} (pid ${child.pid ?? '?'}, ${side})`,
      }));
    };
    const onError = (err: Error): void => {
      done();
      kill();
      reject(sysError(`Unable to execute command '${command}'`, err));
    };
    const onAbort = (): void => {
      done();
      kill();
      reject(abortError());
    };
    child.once('spawn', onSpawn);
    child.on('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

// ---------------------------------------------------------------- fd

/** QEMU's monitor_fd_param: a name starting with a digit is a descriptor number. */
export function resolveFdParam(name: string, lookupFd: (name: string) => number | undefined): number {
  if (/^[0-9]/.test(name)) {
    if (!/^[0-9]+$/.test(name) || !Number.isSafeInteger(Number(name)) || Number(name) > 0x7fffffff) {
      throw new ChannelError(`Invalid file descriptor number '${name}'`, 'EBADF');
    }
    return Number(name);
  }
  const fd = lookupFd(name);
  if (fd === undefined) throw new ChannelError(`File descriptor named '${name}' has not been found`, 'EBADF');
  return fd;
}

function openFd(name: string, side: 'outgoing' | 'incoming', lookupFd: (name: string) => number | undefined): Channel {
  const fd = resolveFdParam(name, lookupFd);
  let st: fs.Stats;
  try {
    st = fs.fstatSync(fd);
  } catch (err) {
    throw sysError(`Unable to use file descriptor ${fd} ('${name}')`, err);
  }
  const what = st.isSocket() ? 'socket' : st.isFIFO() ? 'pipe' : 'file';
  const describe = (): string => `fd:${name} (${what} fd ${fd}, ${side})`;

  if (st.isSocket() || st.isFIFO()) {
    const both = st.isSocket();
    let sock: net.Socket;
    try {
      sock = new net.Socket({
        fd,
        allowHalfOpen: true,
        readable: both || side === 'incoming',
        writable: both || side === 'outgoing',
      });
    } catch (err) {
      throw sysError(`Unable to use file descriptor ${fd} ('${name}')`, err);
    }
    if (both) {
      try {
        sock.setNoDelay(true); // no-op for AF_UNIX
      } catch {
        /* not tcp */
      }
      return new StreamChannel({ input: sock, output: sock, bidirectional: true, ioKind: 'socket', resources: [sock], describe });
    }
    if (side === 'outgoing') {
      const input = endedReadable();
      return new StreamChannel({ input, output: sock, bidirectional: false, ioKind: 'file', resources: [sock], dummies: [input], describe });
    }
    const output = discardWritable();
    return new StreamChannel({ input: sock, output, bidirectional: false, ioKind: 'file', resources: [sock], dummies: [output], describe });
  }

  // A regular file or a character device: blocking I/O on the thread pool.
  if (side === 'outgoing') {
    const output = fs.createWriteStream('', { fd, autoClose: true });
    const input = endedReadable();
    return new StreamChannel({ input, output, bidirectional: false, ioKind: 'file', resources: [output], dummies: [input], describe });
  }
  const input = fs.createReadStream('', { fd, autoClose: true, highWaterMark: 1 << 20 });
  const output = discardWritable();
  return new StreamChannel({ input, output, bidirectional: false, ioKind: 'file', resources: [input], dummies: [output], describe });
}

// ---------------------------------------------------------------- incoming

export async function listenIncoming(uri: MigrationUri, opts: ListenOptions): Promise<IncomingListener> {
  switch (uri.kind) {
    case 'tcp': {
      let host: string | undefined = uri.host === '' ? undefined : uri.host;
      if (host === undefined && uri.family === 4) host = '0.0.0.0';
      if (host === undefined && uri.family === 6) host = '::';
      const listenOpts: net.ListenOptions = { port: uri.port, exclusive: true };
      if (host !== undefined) listenOpts.host = host;
      if (uri.family === 6 && uri.host === '') listenOpts.ipv6Only = true;
      const shown = `${uri.host}:${uri.port}`;
      return SocketListener.listen(listenOpts, opts.extraConnections, (err) =>
        isResolveError(err)
          ? new ChannelError(`address resolution failed for ${shown}: ${strerror(err)}`, errorCode(err), { cause: err })
          : sysError('Failed to bind socket', err),
        (s) => `tcp:${formatHostPort(s.localAddress ?? uri.host, s.localPort ?? uri.port)} (peer ${formatHostPort(s.remoteAddress ?? '?', s.remotePort ?? 0)})`,
      );
    }
    case 'unix':
      await removeStaleSocket(uri.path);
      return SocketListener.listen({ path: uri.path, exclusive: true }, opts.extraConnections,
        (err) => sysError(`Failed to bind socket to ${uri.path}`, err),
        () => `unix:${uri.path}`);
    case 'exec':
      return new ReadyListener(await spawnExec(uri.command, 'incoming'));
    case 'fd':
      return new ReadyListener(openFd(uri.name, 'incoming', opts.lookupFd));
  }
}

/**
 * QEMU unlinks whatever is at the path before binding. We are gentler: a
 * socket nobody listens on (stale) is removed, a live one is "in use", and
 * anything else is left for bind to refuse. Liveness comes from
 * /proc/net/unix (a probe connect would eat a live listener's one
 * connection); without /proc we unlink like QEMU.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) return;
  if (await isListeningUnixSocket(path)) {
    throw new ChannelError(`Failed to bind socket to ${path}: ${strerror({ code: 'EADDRINUSE' })}`, 'EADDRINUSE');
  }
  try {
    await fs.promises.unlink(path);
  } catch (err) {
    if (errorCode(err) !== 'ENOENT') throw sysError(`Failed to unlink socket ${path}`, err);
  }
}

const SO_ACCEPTCON = 0x10000;

async function isListeningUnixSocket(path: string): Promise<boolean> {
  let table: string;
  try {
    table = await fs.promises.readFile('/proc/net/unix', 'latin1');
  } catch {
    return false;
  }
  const wanted = new Set([path, pathResolve(path)]);
  try {
    wanted.add(await fs.promises.realpath(path));
  } catch {
    /* keep the others */
  }
  for (const line of table.split('\n').slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const flags = parseInt(f[3]!, 16);
    const p = f.slice(7).join(' ');
    if ((flags & SO_ACCEPTCON) !== 0 && (wanted.has(p) || wanted.has(pathResolve(p)))) return true;
  }
  return false;
}

class SocketListener implements IncomingListener {
  #server: net.Server;
  #address: ListenAddress | undefined;
  #describeConn: (s: net.Socket) => string;
  #channel: StreamChannel | undefined;
  #taken = false;
  #closed = false;
  #waiter: { resolve(c: Channel): void; reject(e: Error): void } | undefined;
  #extraWanted: () => number;
  /** Extra connections expected (decided when the first one came), and those that came. */
  #extraCount = 0;
  #extras: net.Socket[] = [];
  #extraWaiter: { resolve(s: net.Socket[]): void; reject(e: Error): void } | undefined;
  #extrasTaken = false;

  static listen(
    listenOpts: net.ListenOptions,
    extraConnections: (() => number) | undefined,
    mapError: (err: unknown) => ChannelError,
    describeConn: (s: net.Socket) => string,
  ): Promise<SocketListener> {
    return new Promise<SocketListener>((resolve, reject) => {
      const server = net.createServer({ allowHalfOpen: true, noDelay: true });
      const onError = (err: Error): void => {
        server.off('listening', onListening);
        server.on('error', () => {});
        server.close();
        reject(mapError(err));
      };
      const onListening = (): void => {
        server.off('error', onError);
        resolve(new SocketListener(server, describeConn, extraConnections ?? (() => 0)));
      };
      server.once('error', onError);
      server.once('listening', onListening);
      try {
        server.listen(listenOpts);
      } catch (err) {
        server.off('error', onError);
        server.off('listening', onListening);
        reject(mapError(err));
      }
    });
  }

  private constructor(server: net.Server, describeConn: (s: net.Socket) => string, extraWanted: () => number) {
    this.#server = server;
    this.#extraWanted = extraWanted;
    this.#describeConn = describeConn;
    const a = server.address();
    if (typeof a === 'string') this.#address = { path: a };
    else if (a !== null) this.#address = { host: a.address, port: a.port };
    server.on('error', () => {}); // after listening: nothing to report (accept errors are retried by libuv)
    server.on('connection', (sock) => this.#onConnection(sock));
  }

  #onConnection(sock: net.Socket): void {
    if (!this.#closed && this.#channel !== undefined && this.#extras.length < this.#extraCount) {
      this.#onExtra(sock);
      return;
    }
    if (this.#closed || this.#channel !== undefined) {
      sock.on('error', () => {});
      sock.destroy();
      return;
    }
    if (sock.remoteFamily !== undefined) {
      sock.setNoDelay(true);
      armLiveness(sock);
    }
    this.#channel = new StreamChannel({
      input: sock, output: sock, bidirectional: true, ioKind: 'socket', resources: [sock],
      describe: () => this.#describeConn(sock),
    });
    this.#extraCount = this.#extraWanted();
    if (this.#extraCount === 0) this.#server.close(); // one connection only, like QEMU
    const w = this.#waiter;
    if (w !== undefined) {
      this.#waiter = undefined;
      this.#taken = true;
      w.resolve(this.#channel);
    }
  }

  accept(): Promise<Channel> {
    if (this.#taken || this.#waiter !== undefined) {
      return Promise.reject(new ChannelError('The incoming connection has already been accepted', 'EALREADY'));
    }
    if (this.#channel !== undefined) {
      this.#taken = true;
      return Promise.resolve(this.#channel);
    }
    if (this.#closed) return Promise.reject(new ChannelError('Incoming migration listener closed', 'ABORT_ERR'));
    return new Promise<Channel>((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  /**
   * An extra connection: nobody reads it through Node (its descriptor is
   * read by a worker), so reading stops before the first read (the socket
   * was created in this same turn of the event loop).
   */
  #onExtra(sock: net.Socket): void {
    const handle = (sock as unknown as { _handle?: { reading: boolean; readStop(): number } })._handle;
    if (handle !== undefined) {
      handle.reading = false;
      handle.readStop();
    }
    sock.on('error', () => {});
    if (sock.remoteFamily !== undefined) sock.setNoDelay(true);
    this.#extras.push(sock);
    if (this.#extras.length === this.#extraCount) {
      this.#server.close();
      const w = this.#extraWaiter;
      this.#extraWaiter = undefined;
      if (w !== undefined) {
        this.#extrasTaken = true;
        w.resolve(this.#extras);
      }
    }
  }

  acceptExtra(): Promise<net.Socket[]> {
    if (this.#extras.length === this.#extraCount && this.#channel !== undefined) {
      this.#extrasTaken = true;
      return Promise.resolve(this.#extras);
    }
    if (this.#closed) return Promise.reject(new ChannelError('Incoming migration listener closed', 'ABORT_ERR'));
    return new Promise((resolve, reject) => {
      this.#extraWaiter = { resolve, reject };
    });
  }

  address(): ListenAddress | undefined {
    return this.#address;
  }

  describe(): string {
    const a = this.#address;
    if (a === undefined) return 'listener';
    return 'path' in a ? `unix:${a.path}` : `tcp:${formatHostPort(a.host, a.port)}`;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#server.close();
    if (this.#channel !== undefined && !this.#taken) this.#channel.close();
    const w = this.#waiter;
    if (w !== undefined) {
      this.#waiter = undefined;
      w.reject(new ChannelError('Incoming migration listener closed', 'ABORT_ERR'));
    }
    // the extra connections nobody took close with the listener
    if (!this.#extrasTaken) for (const sock of this.#extras) sock.destroy();
    const x = this.#extraWaiter;
    if (x !== undefined) {
      this.#extraWaiter = undefined;
      x.reject(new ChannelError('Incoming migration listener closed', 'ABORT_ERR'));
    }
  }
}

/** exec: and fd: incoming: the channel exists as soon as the listener does. */
class ReadyListener implements IncomingListener {
  #channel: Channel;
  #taken = false;
  #closed = false;
  constructor(channel: Channel) {
    this.#channel = channel;
  }
  accept(): Promise<Channel> {
    if (this.#taken) return Promise.reject(new ChannelError('The incoming connection has already been accepted', 'EALREADY'));
    if (this.#closed) return Promise.reject(new ChannelError('Incoming migration listener closed', 'ABORT_ERR'));
    this.#taken = true;
    return Promise.resolve(this.#channel);
  }
  address(): undefined {
    return undefined;
  }
  describe(): string {
    return this.#channel.describe();
  }
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (!this.#taken) this.#channel.close();
  }
}
