// The relay's handshake packets (docs/protocol.md §3 and §10), the one place where each is
// encoded and decoded. A packet is a 6-byte ASCII header `UUUU TT` then a body whose layout
// depends on the type; there is no length field, so the reader must know every layout.
//
// A frame is { uid, packet }: uid is the destination in what we write (0 = the relay) and the
// source in what we read. A packet is { type, ...fields } with bytes as Uint8Array.

import { concat } from './bytes.js';

export const RELAY_UID = 0;
export const PUBLIC_SIZE = 34;
export const POINT_SIZE = 32;
export const VALIDATOR_SIZE = 64;
export const MAX_IDENTITY = 53;
export const MAX_PACKET = 408; // bob's parser buffer
const HEADER_SIZE = 6;

export const T = Object.freeze({
  HELLO_SERVER: 0x00,
  HELLO_CLIENT: 0x01,
  SERVER_IDENTITY: 0x02,
  CLIENT_IDENTITY: 0x03,
  NEW_SERVER: 0x04,
  CLIENT_VALIDATOR: 0x05,
  Y_AND_SERVER_VALIDATOR: 0x06,
  X_AND_CLIENT_IDENTITY: 0x07,
  AGREEMENT: 0x08,
  CLOSED: 0x09,
  ACCEPTED: 0x0a,
  REFUSED: 0x0b,
  RELAY_FAILURE: 0x0c,
  SPOKE_FAILURE: 0x0d,
  DONE: 0x0e,
  TIMEOUT: 0x0f,
  HELLO_SCOPED_CLIENT: 0x10,
});

export class WireError extends Error {}

const ASCII = new TextEncoder();
const RELAY_FAILURE_LETTERS = 'CSHN';

function hex4(uid) {
  if (!Number.isInteger(uid) || uid < 0 || uid > 0xffff) throw new RangeError(`UID ${uid} is outside 0000-ffff`);
  return ASCII.encode(uid.toString(16).padStart(4, '0'));
}

function isHexByte(c) {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
}

function parseHex(u8, what) {
  // parseInt would also take "0x", signs and spaces; the protocol takes only hex digits.
  if (!u8.length || !u8.every(isHexByte)) throw new WireError(`${what} is not hexadecimal: ${quote(u8)}`);
  return parseInt(String.fromCharCode(...u8), 16);
}

function quote(u8) {
  return JSON.stringify(String.fromCharCode(...u8));
}

function sized(value, size, what) {
  if (!(value instanceof Uint8Array) || value.length !== size) {
    throw new RangeError(`${what} must be ${size} bytes`);
  }
  return value;
}

function identityBytes(identity) {
  sized(identity, identity.length, 'identity');
  if (identity.length > MAX_IDENTITY) throw new WireError(`identity is ${identity.length} bytes, over ${MAX_IDENTITY}`);
  if (identity.includes(0) || identity.includes(0x0a)) throw new WireError('identity contains a NUL or newline byte');
  return concat(identity, Uint8Array.of(0));
}

// Per type: the size of the fixed part, whether a NUL-ended identity follows it, how to build
// the body from a packet, and how to read a packet back from (fixed part, identity).
const LAYOUTS = {
  [T.HELLO_SERVER]: {
    fixed: PUBLIC_SIZE, text: false,
    body: (p) => sized(p.public, PUBLIC_SIZE, 'public'),
    read: (f) => ({ public: f }),
  },
  [T.HELLO_CLIENT]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.SERVER_IDENTITY]: {
    fixed: 0, text: true, body: (p) => identityBytes(p.identity), read: (f, id) => ({ identity: id }),
  },
  [T.CLIENT_IDENTITY]: {
    fixed: 0, text: true, body: (p) => identityBytes(p.identity), read: (f, id) => ({ identity: id }),
  },
  [T.NEW_SERVER]: {
    fixed: 4 + PUBLIC_SIZE, text: true,
    body: (p) => concat(hex4(p.serverUid), sized(p.public, PUBLIC_SIZE, 'public'), identityBytes(p.identity)),
    read: (f, id) => ({ serverUid: parseHex(f.subarray(0, 4), 'New_server UID'), public: f.subarray(4), identity: id }),
  },
  [T.CLIENT_VALIDATOR]: {
    fixed: VALIDATOR_SIZE, text: false,
    body: (p) => sized(p.validator, VALIDATOR_SIZE, 'validator'),
    read: (f) => ({ validator: f }),
  },
  [T.Y_AND_SERVER_VALIDATOR]: {
    fixed: POINT_SIZE + VALIDATOR_SIZE, text: false,
    body: (p) => concat(sized(p.y, POINT_SIZE, 'Y'), sized(p.validator, VALIDATOR_SIZE, 'validator')),
    read: (f) => ({ y: f.subarray(0, POINT_SIZE), validator: f.subarray(POINT_SIZE) }),
  },
  [T.X_AND_CLIENT_IDENTITY]: {
    fixed: POINT_SIZE, text: true,
    body: (p) => concat(sized(p.x, POINT_SIZE, 'X'), identityBytes(p.identity)),
    read: (f, id) => ({ x: f, identity: id }),
  },
  [T.AGREEMENT]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.CLOSED]: {
    fixed: 4, text: false, body: (p) => hex4(p.peerUid),
    read: (f) => ({ peerUid: parseHex(f, 'Closed UID') }),
  },
  [T.ACCEPTED]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.REFUSED]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.RELAY_FAILURE]: {
    fixed: 5, text: false,
    body: (p) => {
      if (p.letter.length !== 1 || !RELAY_FAILURE_LETTERS.includes(p.letter)) {
        throw new RangeError(`Relay_failure letter must be one of C, S, H, N, not ${p.letter}`);
      }
      return concat(ASCII.encode(p.letter), hex4(p.peerUid));
    },
    read: (f) => {
      const letter = String.fromCharCode(f[0]);
      if (!RELAY_FAILURE_LETTERS.includes(letter)) throw new WireError(`Relay_failure letter ${quote(f.subarray(0, 1))} is not C, S, H or N`);
      return { letter, peerUid: parseHex(f.subarray(1), 'Relay_failure UID') };
    },
  },
  [T.SPOKE_FAILURE]: {
    fixed: 1, text: false,
    body: (p) => {
      if (!Number.isInteger(p.code) || p.code < 0 || p.code > 4) throw new RangeError(`Spoke_failure code ${p.code} is not 0-4`);
      return Uint8Array.of(p.code);
    },
    read: (f) => {
      if (f[0] > 4) throw new WireError(`Spoke_failure code ${f[0]} is not 0-4`);
      return { code: f[0] };
    },
  },
  [T.DONE]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.TIMEOUT]: { fixed: 0, text: false, body: () => new Uint8Array(0), read: () => ({}) },
  [T.HELLO_SCOPED_CLIENT]: {
    fixed: 2, text: false,
    body: (p) => {
      if (!Number.isInteger(p.nameplate) || p.nameplate < 0 || p.nameplate > 0xffff) throw new RangeError(`nameplate ${p.nameplate} is not 0..65535`);
      return Uint8Array.of(p.nameplate >>> 8, p.nameplate & 0xff);
    },
    read: (f) => ({ nameplate: (f[0] << 8) | f[1] }),
  },
};

/** The exact bytes of one packet, header included (lowercase hex, as bob writes it). */
export function encode(uid, packet) {
  const layout = LAYOUTS[packet.type];
  if (!layout) throw new RangeError(`unknown packet type ${packet.type}`);
  const type = ASCII.encode(packet.type.toString(16).padStart(2, '0'));
  const data = concat(hex4(uid), type, layout.body(packet));
  if (data.length > MAX_PACKET) throw new RangeError(`packet of ${data.length} bytes exceeds bob's ${MAX_PACKET}-byte buffer`);
  return data;
}

// Constructors, so callers never spell a layout out.
export const helloServer = (publicBytes) => ({ type: T.HELLO_SERVER, public: publicBytes });
export const helloClient = () => ({ type: T.HELLO_CLIENT });
export const helloScopedClient = (nameplate) => ({ type: T.HELLO_SCOPED_CLIENT, nameplate });
export const serverIdentity = (identity) => ({ type: T.SERVER_IDENTITY, identity });
export const clientIdentity = (identity) => ({ type: T.CLIENT_IDENTITY, identity });
export const newServer = (serverUid, publicBytes, identity) => ({ type: T.NEW_SERVER, serverUid, public: publicBytes, identity });
export const clientValidator = (validator) => ({ type: T.CLIENT_VALIDATOR, validator });
export const yAndServerValidator = (y, validator) => ({ type: T.Y_AND_SERVER_VALIDATOR, y, validator });
export const xAndClientIdentity = (x, identity) => ({ type: T.X_AND_CLIENT_IDENTITY, x, identity });
export const agreement = () => ({ type: T.AGREEMENT });
export const closed = (peerUid) => ({ type: T.CLOSED, peerUid });
export const accepted = () => ({ type: T.ACCEPTED });
export const refused = () => ({ type: T.REFUSED });
export const relayFailure = (letter, peerUid) => ({ type: T.RELAY_FAILURE, letter, peerUid });
export const spokeFailure = (code) => ({ type: T.SPOKE_FAILURE, code });
export const done = () => ({ type: T.DONE });
export const timeout = () => ({ type: T.TIMEOUT });

/**
 * Parses a byte stream fed in arbitrary pieces into frames. It holds at most one partial
 * packet once drained; after a WireError it stays broken (the stream cannot be resynced).
 */
export class PacketReader {
  constructor() {
    this._buffer = new Uint8Array(0);
    this._failure = null;
  }

  feed(data) {
    if (this._failure) throw this._failure;
    this._buffer = this._buffer.length ? concat(this._buffer, data) : Uint8Array.from(data);
  }

  /** The next whole frame, or null until more bytes come. */
  next() {
    if (this._failure) throw this._failure;
    let parsed;
    try {
      parsed = parseOne(this._buffer);
    } catch (error) {
      this._failure = error instanceof WireError ? error : new WireError(String(error.message || error));
      throw this._failure;
    }
    if (!parsed) return null;
    this._buffer = this._buffer.slice(parsed.end);
    return parsed.frame;
  }

  /** Every whole frame buffered so far. */
  frames() {
    const out = [];
    for (let frame = this.next(); frame; frame = this.next()) out.push(frame);
    return out;
  }

  get pending() {
    return this._buffer.length;
  }
}

function parseOne(buf) {
  // Reject a non-hex header byte as soon as it arrives.
  const early = Math.min(buf.length, HEADER_SIZE);
  for (let i = 0; i < early; i++) {
    if (!isHexByte(buf[i])) throw new WireError(`header byte ${quote(buf.subarray(i, i + 1))} is not hexadecimal`);
  }
  if (buf.length < HEADER_SIZE) return null;
  const uid = parseHex(buf.subarray(0, 4), 'UID');
  const type = parseHex(buf.subarray(4, 6), 'packet type');
  const layout = LAYOUTS[type];
  if (!layout) throw new WireError(`packet type ${type.toString(16).padStart(2, '0')} is unknown`);
  const fixedEnd = HEADER_SIZE + layout.fixed;
  if (buf.length < fixedEnd) return null;
  const fixed = buf.slice(HEADER_SIZE, fixedEnd);
  let identity = null;
  let end = fixedEnd;
  if (layout.text) {
    const window = buf.subarray(fixedEnd, fixedEnd + MAX_IDENTITY + 1);
    const nul = window.indexOf(0);
    if (nul < 0) {
      if (window.length > MAX_IDENTITY) throw new WireError(`identity in packet type ${type.toString(16).padStart(2, '0')} has no NUL within ${MAX_IDENTITY} bytes`);
      return null;
    }
    identity = buf.slice(fixedEnd, fixedEnd + nul);
    if (identity.includes(0x0a)) throw new WireError('identity contains a newline byte');
    end = fixedEnd + nul + 1;
  }
  return { frame: { uid, packet: { type, ...layout.read(fixed, identity) } }, end };
}
