/**
 * User-creatable objects (-object / object-add): memory-backend-ram and the
 * tls-creds family. Credentials are checked when the object is created, as
 * QEMU loads them at creation.
 */
import { createTlsCreds, isTlsCredsType, TlsCredsError } from '../crypto/tls-creds.js';
import { QmpError } from '../qapi/errors.js';
import type { UserObject } from './context.js';

/** Validate and register a new object; throws QmpError with QEMU's texts. */
export function addObject(objects: Map<string, UserObject>, obj: UserObject): void {
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(obj.id)) {
    throw new QmpError('GenericError', `Parameter 'id' expects an identifier`);
  }
  if (objects.has(obj.id)) {
    throw new QmpError('GenericError', `attempt to add duplicate property '${obj.id}' to object (type 'container')`);
  }
  if (isTlsCredsType(obj.qomType)) {
    try {
      obj.tls = createTlsCreds(obj.qomType, obj.id, obj.props);
    } catch (e) {
      if (e instanceof TlsCredsError) throw new QmpError('GenericError', e.message);
      throw e;
    }
  } else if (obj.qomType === 'memory-backend-ram') {
    if (typeof obj.props.size !== 'number' || obj.props.size <= 0) {
      throw new QmpError('GenericError', "can't create backend with size 0");
    }
    const p = obj.props.prealloc;
    if (p !== undefined && typeof p !== 'boolean') {
      if (typeof p !== 'string' || !BOOL_WORDS.has(p)) throw new QmpError('GenericError', "Parameter 'prealloc' expects 'on' or 'off'");
      obj.props.prealloc = BOOL_WORDS.get(p);
    }
  } else {
    throw new QmpError('GenericError', `Invalid parameter type for 'qom-type', expected: ObjectType`);
  }
  objects.set(obj.id, obj);
}

/** QEMU's spellings of a bool property on the command line. */
const BOOL_WORDS = new Map([['on', true], ['yes', true], ['true', true], ['y', true], ['off', false], ['no', false], ['false', false], ['n', false]]);

export function deleteObject(objects: Map<string, UserObject>, id: string, inUse: (id: string) => boolean): void {
  if (!objects.has(id)) throw new QmpError('GenericError', `object '${id}' not found`);
  if (inUse(id)) throw new QmpError('GenericError', `object '${id}' is in use, can not be deleted`);
  objects.delete(id);
}
