/**
 * Disk images: the `BlockImage` interface and its raw and qcow2 drivers,
 * backing chains, image creation. A leaf layer: imports only base/.
 */
export { BlockError, IMAGE_FORMATS } from './types.js';
export type { BlockImage, BlockStatus, CreateOptions, ImageFormat, OpenOptions } from './types.js';
export { backingPath, createImage, openImage } from './open.js';
