/**
 * Constants of QEMU's migration stream format (docs/spec/stream-format.md, docs/spec/xbzrle.md).
 * One named table; every number that appears on the wire is here.
 */
export const WIRE = {
  /** "QEVM" */
  MAGIC: 0x5145564d,
  VERSION: 3,
  /** Version 2 is recognised and refused as obsolete. */
  VERSION_V2: 2,

  /** Section loop record types (u8). */
  SECTION: {
    EOF: 0x00,
    START: 0x01,
    PART: 0x02,
    END: 0x03,
    FULL: 0x04,
    SUBSECTION: 0x05,
    VMDESCRIPTION: 0x06,
    CONFIGURATION: 0x07,
    COMMAND: 0x08,
    FOOTER: 0x7e,
  },

  /** RAM record flags (low bits of the be64 header word; TARGET_PAGE_SIZE 4096). */
  RAM: {
    FULL: 0x001,
    ZERO: 0x002,
    MEM_SIZE: 0x004,
    PAGE: 0x008,
    EOS: 0x010,
    CONTINUE: 0x020,
    XBZRLE: 0x040,
    HOOK: 0x080,
    COMPRESS_PAGE: 0x100,
    MULTIFD_FLUSH: 0x200,
    /** flags live below the page size */
    FLAG_MASK: 0xfff,
    /** `ram` section: idstr, instance, the only version the loader accepts */
    IDSTR: 'ram',
    INSTANCE: 0,
    VERSION: 4,
    /** XBZRLE encoding id byte */
    XBZRLE_ENCODING: 0x01,
  },

  /** COMMAND record numbers (be16) — QEMU 2.10 knows 1..7. */
  CMD: {
    INVALID: 0,
    OPEN_RETURN_PATH: 1,
    PING: 2,
    POSTCOPY_ADVISE: 3,
    POSTCOPY_LISTEN: 4,
    POSTCOPY_RUN: 5,
    POSTCOPY_RAM_DISCARD: 6,
    PACKAGED: 7,
    /** first number 2.10 does not know */
    MAX: 8,
  },

  /** Return-path message numbers (be16 type, be16 len) — 2.10 knows 1..4. */
  RP: {
    INVALID: 0,
    SHUT: 1,
    PONG: 2,
    REQ_PAGES_ID: 3,
    REQ_PAGES: 4,
    MAX: 5,
  },

  LIMITS: {
    TARGET_PAGE_BITS: 12,
    TARGET_PAGE_SIZE: 4096,
    /** largest return-path message payload the source accepts */
    RP_MAX_LEN: 512,
    /** 2.10 MAX_VM_CMD_PACKAGED_SIZE ("Unreasonably large packaged state") */
    PACKAGED_MAX: 1 << 24,
    /** POSTCOPY_RAM_DISCARD: at most 12 ranges per command */
    DISCARD_MAX_RANGES: 12,
    /** compressBound(4096) = 4096 + 4096/4096 + 13 */
    COMPRESS_BOUND: 4110,
    /** counted strings: u8 length */
    COUNTED_STRING_MAX: 255,
    /** globalstate runstate buffer */
    GLOBALSTATE_RUNSTATE_LEN: 100,
    /** our own cap on a be32-framed device payload (not a QEMU limit) */
    DEVICE_PAYLOAD_MAX: 1 << 26,
    /** our own cap on the vmdesc JSON (not a QEMU limit) */
    VMDESC_MAX: 1 << 24,
    /** our own cap on the configuration machine name (not a QEMU limit) */
    MACHINE_NAME_MAX: 1024,
  },

  /** Fixed vmstate sizes of the two QEMU devices a RAM-only peer sees. */
  DEVICE: {
    TIMER: { IDSTR: 'timer', VERSION: 2, SIZE: 24 },
    GLOBALSTATE: { IDSTR: 'globalstate', VERSION: 1, SIZE: 104 },
  },
} as const;

/** Command names as QEMU prints them, indexed by number (2.10 mig_cmd_args). */
export const CMD_NAMES: readonly string[] = [
  'INVALID',
  'OPEN_RETURN_PATH',
  'PING',
  'POSTCOPY_ADVISE',
  'POSTCOPY_LISTEN',
  'POSTCOPY_RUN',
  'POSTCOPY_RAM_DISCARD',
  'PACKAGED',
];
/** Fixed data length per command, -1 = variable (2.10 mig_cmd_args). */
export const CMD_LENGTHS: readonly number[] = [-1, 0, 4, 16, 0, 0, -1, 4];

/** Return-path message names (2.10 rp_cmd_args). */
export const RP_NAMES: readonly string[] = ['INVALID', 'SHUT', 'PONG', 'REQ_PAGES_ID', 'REQ_PAGES'];
/** Fixed return-path message length, -1 = variable. */
export const RP_LENGTHS: readonly number[] = [-1, 4, 4, -1, 12];
