/**
 * The checks QEMU makes of an x509 credential directory when the object is
 * created (docs/spec/tls.md, "x509 sanity checks"): each certificate's
 * validity dates, basic constraints, key usage and purpose for its role,
 * and our own certificate against our CA, each failure with QEMU's text.
 * Node's X509Certificate gives the dates, the CA flag and signature checks;
 * the extensions' critical flags and the key usage bits come from
 * @peculiar/asn1-x509 (a maintained ASN.1 schema of RFC 5280, so that no
 * DER is parsed by hand here).
 */
import { X509Certificate } from 'node:crypto';
import { AsnConvert } from '@peculiar/asn1-schema';
import {
  BasicConstraints,
  Certificate,
  ExtendedKeyUsage,
  KeyUsage,
  KeyUsageFlags,
  anyExtendedKeyUsage,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_kp_clientAuth,
  id_kp_serverAuth,
} from '@peculiar/asn1-x509';
import { TlsCredsError } from './errors.js';

/** What a certificate is for: a CA of ours, or the leaf of our endpoint. */
type Role = 'ca' | 'server' | 'client';

interface Extensions {
  basicConstraints?: { ca: boolean; critical: boolean };
  keyUsage?: { bits: number; critical: boolean };
  purposes?: { oids: string[]; critical: boolean };
}

function extensionsOf(cert: X509Certificate): Extensions {
  const out: Extensions = {};
  const parsed = AsnConvert.parse(cert.raw, Certificate);
  for (const e of parsed.tbsCertificate.extensions ?? []) {
    const value = e.extnValue.buffer;
    if (e.extnID === id_ce_basicConstraints) {
      out.basicConstraints = { ca: AsnConvert.parse(value, BasicConstraints).cA, critical: e.critical };
    } else if (e.extnID === id_ce_keyUsage) {
      out.keyUsage = { bits: AsnConvert.parse(value, KeyUsage).toNumber(), critical: e.critical };
    } else if (e.extnID === id_ce_extKeyUsage) {
      out.purposes = { oids: [...AsnConvert.parse(value, ExtendedKeyUsage)], critical: e.critical };
    }
  }
  return out;
}

function checkTimes(cert: X509Certificate, file: string, role: Role, now: Date): void {
  const who = role === 'ca' ? 'CA' : role;
  if (new Date(cert.validTo) < now) throw new TlsCredsError(`The ${who} certificate ${file} has expired`);
  if (new Date(cert.validFrom) > now) throw new TlsCredsError(`The ${who} certificate ${file} is not yet active`);
}

function checkBasicConstraints(ext: Extensions, file: string, role: Role): void {
  const bc = ext.basicConstraints;
  if (bc === undefined) {
    if (role === 'ca') throw new TlsCredsError(`The certificate ${file} is missing basic constraints for a CA`);
    return;
  }
  if (bc.ca && role !== 'ca') {
    throw new TlsCredsError(`The certificate ${file} basic constraints show a CA, but we need one for a ${role}`);
  }
  if (!bc.ca && role === 'ca') throw new TlsCredsError(`The certificate ${file} basic constraints do not show a CA`);
}

/** Only a critical key usage extension can forbid (as QEMU reads it). */
function checkKeyUsage(ext: Extensions, file: string, role: Role): void {
  const ku = ext.keyUsage;
  if (ku === undefined || !ku.critical) return;
  if (role === 'ca') {
    if (!(ku.bits & KeyUsageFlags.keyCertSign)) throw new TlsCredsError(`Certificate ${file} usage does not permit certificate signing`);
    return;
  }
  if (!(ku.bits & KeyUsageFlags.digitalSignature)) throw new TlsCredsError(`Certificate ${file} usage does not permit digital signature`);
  // QEMU 7.2 checks no more than that: a leaf without key encipherment (usual for EC keys) loads
}

/** No extended key usage at all allows both; a critical one must name our role (or anyExtendedKeyUsage). */
function checkPurpose(ext: Extensions, file: string, role: 'server' | 'client'): void {
  const p = ext.purposes;
  if (p === undefined || !p.critical) return;
  const want = role === 'server' ? id_kp_serverAuth : id_kp_clientAuth;
  if (p.oids.includes(want) || p.oids.includes(anyExtendedKeyUsage)) return;
  throw new TlsCredsError(`Certificate ${file} purpose does not allow use with a TLS ${role}`);
}

function checkCert(cert: X509Certificate, file: string, role: Role, now: Date): void {
  checkTimes(cert, file, role, now);
  const ext = extensionsOf(cert);
  checkBasicConstraints(ext, file, role);
  checkKeyUsage(ext, file, role);
  if (role !== 'ca') checkPurpose(ext, file, role);
}

/** Every certificate of a PEM bundle. */
export function parseCertList(pem: string, file: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  try {
    const certs = blocks.map((b) => new X509Certificate(b));
    if (certs.length === 0) throw new Error('no certificate');
    return certs;
  } catch {
    throw new TlsCredsError(`Unable to import CA certificate list ${file}`);
  }
}

export function parseCert(pem: string, file: string, role: 'server' | 'client'): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (e) {
    throw new TlsCredsError(`Unable to import ${role} certificate ${file}: ${(e as Error).message}`);
  }
}

/**
 * QEMU's sanity check: our certificate (when there is one) and every CA
 * certificate for their roles, then our certificate against the CAs.
 */
export function sanityCheck(opts: {
  role: 'server' | 'client';
  cert?: { x509: X509Certificate; file: string };
  cas: X509Certificate[];
  caFile: string;
  now: Date;
}): void {
  const { role, cert, cas, caFile, now } = opts;
  if (cert) checkCert(cert.x509, cert.file, role, now);
  for (const ca of cas) checkCert(ca, caFile, 'ca', now);
  if (cert && cas.length > 0) {
    const issuer = cas.find((ca) => cert.x509.checkIssued(ca));
    let reason: string | undefined;
    if (issuer === undefined) reason = "The certificate hasn't got a known issuer";
    else if (!cert.x509.verify(issuer.publicKey)) reason = 'The certificate is not trusted';
    if (reason !== undefined) throw new TlsCredsError(`Our own certificate ${cert.file} failed validation against ${caFile}: ${reason}`);
  }
}
