/**
 * NBD, the Network Block Device protocol: a server that exports images
 * (QMP nbd-server-start/-add/-remove/-stop) and a client (block
 * replication's primary mirrors its writes with it). Imports only block/
 * and base/.
 */
export * from './protocol.js';
export { describeAddress, formatNbdUri, parseNbdUri, type NbdAddress, type NbdTarget } from './address.js';
export { NbdConnectionError, NbdError } from './errors.js';
export { NbdClient, type ClientOptions, type ExportEntry } from './client.js';
export { NbdExport, NbdServer, NbdServerError, type ExportOptions, type NbdExportTarget } from './server.js';
export { imageTarget } from './target.js';
