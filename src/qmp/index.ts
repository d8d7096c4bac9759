export * from './types.js';
export * from './json.js';
export * from './address.js';
export * from './server.js';
export * from './client.js';
export * from "./scm-rights.js";
