/**
 * User-creatable objects (-object / object-add): memory-backend-ram and the
 * tls-creds family. Credentials are checked when the object is created, as
 * QEMU loads them at creation.
 */
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import { QmpError } from '../qapi/errors.js';
import type { UserObject } from './context.js';

const TLS_FILES: Record<string, { server: string[]; client: string[] }> = {
  'tls-creds-x509': { server: ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'], client: ['ca-cert.pem'] },
  'tls-creds-psk': { server: ['keys.psk'], client: ['keys.psk'] },
  'tls-creds-anon': { server: [], client: [] },
};

function checkReadable(path: string): void {
  try {
    accessSync(path, constants.R_OK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'No such file or directory' : code === 'EACCES' ? 'Permission denied' : String(code);
    throw new QmpError('GenericError', `Unable to access credentials ${path}: ${why}`);
  }
}

/** Validate and register a new object; throws QmpError with QEMU's texts. */
export function addObject(objects: Map<string, UserObject>, obj: UserObject): void {
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(obj.id)) {
    throw new QmpError('GenericError', `Parameter 'id' expects an identifier`);
  }
  if (objects.has(obj.id)) {
    throw new QmpError('GenericError', `attempt to add duplicate property '${obj.id}' to object (type 'container')`);
  }
  const files = TLS_FILES[obj.qomType];
  if (files) {
    const endpoint = (obj.props.endpoint as string | undefined) ?? 'client';
    if (endpoint !== 'client' && endpoint !== 'server') {
      throw new QmpError('GenericError', `Parameter 'endpoint' does not accept value '${endpoint}'`);
    }
    const dir = obj.props.dir as string | undefined;
    if (dir !== undefined) {
      for (const f of files[endpoint === 'server' ? 'server' : 'client']) checkReadable(join(dir, f));
    } else if (obj.qomType !== 'tls-creds-anon') {
      throw new QmpError('GenericError', `Parameter 'dir' is missing`);
    }
  } else if (obj.qomType === 'memory-backend-ram') {
    if (typeof obj.props.size !== 'number' || obj.props.size <= 0) {
      throw new QmpError('GenericError', "can't create backend with size 0");
    }
  } else {
    throw new QmpError('GenericError', `Invalid parameter type for 'qom-type', expected: ObjectType`);
  }
  objects.set(obj.id, obj);
}

export function deleteObject(objects: Map<string, UserObject>, id: string, inUse: (id: string) => boolean): void {
  if (!objects.has(id)) throw new QmpError('GenericError', `object '${id}' not found`);
  if (inUse(id)) throw new QmpError('GenericError', `object '${id}' is in use, can not be deleted`);
  objects.delete(id);
}
