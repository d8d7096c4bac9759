export { ChannelError } from './errors.js';
export { parseMigrationUri, formatMigrationUri, type MigrationUri, type MigrationSide } from './uri.js';
export type { Channel } from './channel.js';
export {
  connectOutgoing,
  connectExtraSocket,
  listenIncoming,
  resolveFdParam,
  type ConnectOptions,
  type ListenOptions,
  type ListenAddress,
  type IncomingListener,
} from './transports.js';
export { WrappedChannel, openOutgoing, acceptIncoming, type ChannelWrapper, type ChannelSide, type WrappedStreams } from './wrap.js';
export { endOutput, linger, closeAfterShut, LINGER_MS, SHUT_LINGER_MS } from './policies.js';
