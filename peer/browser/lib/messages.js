// The data phase's messages (docs/transfer.md §2): each one encoded and decoded here, and
// only here. One record plaintext is exactly one message: a type byte, then its body.
// Decoding refuses anything malformed with a ProtocolError, the one error bad input causes.

import { blake2b } from '../vendor/noble.js';

export const PROTOCOL_VERSION = 1;
export const MAX_RECORD_SIZE = 0x7fff;          // bob's readers stop there
export const MAX_BIG_RECORD_SIZE = 256 * 1024;  // feature big-records
export const MAX_DATA_SIZE = MAX_RECORD_SIZE - 1;
export const MAX_BIG_DATA_SIZE = MAX_BIG_RECORD_SIZE - 1;
export const MAX_PIECE_SIZE = MAX_RECORD_SIZE - 2;  // an OFFER or ZDATA piece after its flags
export const DIGEST_SIZE = 32;                  // blake3
export const MAX_REASON_BYTES = 1024;
export const MAX_CAPABILITIES = 64;
export const PUBLIC_DIGEST_SIZE = 14;
const PUBLIC_TAG = 'pub-';
const MAGIC = new TextEncoder().encode('peer-relay');

export const TYPE = Object.freeze({
  HELLO: 0x01, OFFER: 0x02, ANSWER: 0x03, FILE: 0x04, DATA: 0x05, FILE_END: 0x06,
  DONE: 0x07, ACK: 0x08, ERROR: 0x09, ZDATA: 0x0a, CHECK: 0x0b,
});
const NAMES = {
  1: 'hello', 2: 'offer', 3: 'answer', 4: 'file start', 5: 'data', 6: 'file end', 7: 'done',
  8: 'ack', 9: 'error', 10: 'compressed data', 11: 'check',
};
export function messageName(type) { return NAMES[type] ?? `message ${type}`; }

export class ProtocolError extends Error {
  constructor(message) { super(message); this.name = 'ProtocolError'; }
}

export const CAPABILITY = /^[a-z0-9][a-z0-9-]{0,31}$/;

// Control characters, line/paragraph separators and bidi controls: each can disguise or
// reorder what the page shows, so a peer's text never reaches the user with them.
export const UNPRINTABLE = /[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/;
const UNPRINTABLE_ALL = new RegExp(UNPRINTABLE.source, 'g');

/** `text` with every control character replaced by U+FFFD, safe on one line. */
export function printable(text) {
  return text.replace(UNPRINTABLE_ALL, '\ufffd');
}

const encoder = new TextEncoder();
// ignoreBOM: a leading U+FEFF is part of what the peer sent (Python keeps it too).
const lenient = new TextDecoder('utf-8', { ignoreBOM: true });

// --- integers (big-endian); u64 beyond 2^53 come back as BigInt, which never equals a count --

function view(u8) { return new DataView(u8.buffer, u8.byteOffset, u8.byteLength); }

function readU64(u8, at) {
  const value = view(u8).getBigUint64(at);
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

function checkedU64(value, what) {
  const big = BigInt(value);
  if (big < 0n || big > 0xffffffffffffffffn) throw new RangeError(`${what} does not fit 64 bits`);
  return big;
}

function checkedU32(value, what) {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError(`${what} does not fit 32 bits`);
  return value;
}

// --- reasons -----------------------------------------------------------------------------

/** UTF-8, cut at a character boundary to fit MAX_REASON_BYTES. */
export function reasonBytes(reason) {
  const bytes = encoder.encode(String(reason));
  if (bytes.length <= MAX_REASON_BYTES) return bytes;
  let end = MAX_REASON_BYTES;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;  // back to a character's first byte
  return bytes.slice(0, end);
}

function reasonText(body) {
  if (body.length > MAX_REASON_BYTES) {
    throw new ProtocolError(`reason is ${body.length} bytes, over ${MAX_REASON_BYTES}`);
  }
  return printable(lenient.decode(body));
}

/** The first 14 bytes of BLAKE2b(person "peer-relay pub") of the 34-byte spoke public. */
export function publicDigest(publicBytes) {
  return blake2b(publicBytes, { dkLen: PUBLIC_DIGEST_SIZE, personalization: encoder.encode('peer-relay pub\0\0') });
}

function toHex(u8) { return Array.from(u8, (b) => b.toString(16).padStart(2, '0')).join(''); }

// --- encoders: one per message -------------------------------------------------------------

/** HELLO: magic, version u16, the capability names, then the public's digest as `pub-HEX`. */
export function encodeHello({ version = PROTOCOL_VERSION, capabilities = [], publicDigest: digest = null } = {}) {
  const names = [...capabilities];
  for (const name of names) {
    if (!CAPABILITY.test(name) || name.startsWith(PUBLIC_TAG)) throw new RangeError(`invalid capability name ${name}`);
  }
  if (digest) {
    if (digest.length !== PUBLIC_DIGEST_SIZE) throw new RangeError(`the public's digest must be ${PUBLIC_DIGEST_SIZE} bytes`);
    names.push(PUBLIC_TAG + toHex(digest));
  }
  if (names.length > MAX_CAPABILITIES) throw new RangeError('too many capabilities');
  const size = 1 + MAGIC.length + 3 + names.reduce((sum, name) => sum + 1 + name.length, 0);
  const out = new Uint8Array(size);
  out[0] = TYPE.HELLO;
  out.set(MAGIC, 1);
  let at = 1 + MAGIC.length;
  view(out).setUint16(at, version);
  out[at + 2] = names.length;
  at += 3;
  for (const name of names) {
    out[at] = name.length;
    out.set(encoder.encode(name), at + 1);
    at += 1 + name.length;
  }
  return out;
}

function encodePiece(type, more, chunk, what) {
  if (!(chunk.length >= 1 && chunk.length <= MAX_PIECE_SIZE)) throw new RangeError(`a ${what} holds 1..${MAX_PIECE_SIZE} bytes`);
  const out = new Uint8Array(2 + chunk.length);
  out[0] = type;
  out[1] = more ? 1 : 0;
  out.set(chunk, 2);
  return out;
}

/** One OFFER piece; `more` says another follows. */
export function encodeOfferPiece(more, chunk) { return encodePiece(TYPE.OFFER, more, chunk, 'offer piece'); }

/** ANSWER accepting (no resume points: the browser never offers resume). */
export function encodeAccept() { return Uint8Array.of(TYPE.ANSWER, 1, 0, 0, 0, 0); }

/** ANSWER declining, with a reason (may be empty). */
export function encodeDecline(reason = '') {
  const bytes = reasonBytes(reason);
  const out = new Uint8Array(2 + bytes.length);
  out[0] = TYPE.ANSWER;
  out.set(bytes, 2);
  return out;
}

/** FILE: entry index u32, start offset u64. */
export function encodeFileStart(index, offset = 0) {
  const out = new Uint8Array(13);
  out[0] = TYPE.FILE;
  view(out).setUint32(1, checkedU32(index, 'the entry index'));
  view(out).setBigUint64(5, checkedU64(offset, 'the offset'));
  return out;
}

/** DATA: the type byte and the bytes (a copy: the record is sealed from one buffer). */
export function encodeData(bytes, { big = false } = {}) {
  const largest = big ? MAX_BIG_DATA_SIZE : MAX_DATA_SIZE;
  if (!(bytes.length >= 1 && bytes.length <= largest)) throw new RangeError(`a data message carries 1..${largest} bytes`);
  const out = new Uint8Array(1 + bytes.length);
  out[0] = TYPE.DATA;
  out.set(bytes, 1);
  return out;
}

/** FILE_END: the file's blake3. */
export function encodeFileEnd(digest) {
  if (digest.length !== DIGEST_SIZE) throw new RangeError(`digest must be ${DIGEST_SIZE} bytes`);
  const out = new Uint8Array(1 + DIGEST_SIZE);
  out[0] = TYPE.FILE_END;
  out.set(digest, 1);
  return out;
}

export function encodeDone() { return Uint8Array.of(TYPE.DONE); }

/** ACK: file count u64, total bytes u64. */
export function encodeAck(fileCount, totalBytes) {
  const out = new Uint8Array(17);
  out[0] = TYPE.ACK;
  view(out).setBigUint64(1, checkedU64(fileCount, 'the file count'));
  view(out).setBigUint64(9, checkedU64(totalBytes, 'the byte total'));
  return out;
}

/** ERROR: a one-line reason, cut at 1024 bytes on a character boundary. */
export function encodeError(reason) {
  const bytes = reasonBytes(reason);
  const out = new Uint8Array(1 + bytes.length);
  out[0] = TYPE.ERROR;
  out.set(bytes, 1);
  return out;
}

// --- decoding ------------------------------------------------------------------------------

function decodeHello(body) {
  if (body.length < MAGIC.length + 3) throw new ProtocolError('hello is too short');
  for (let i = 0; i < MAGIC.length; i++) {
    if (body[i] !== MAGIC[i]) throw new ProtocolError('hello does not start with the peer-relay magic');
  }
  const version = view(body).getUint16(MAGIC.length);
  const count = body[MAGIC.length + 2];
  let at = MAGIC.length + 3;
  const capabilities = [];
  let digest = null;
  for (let index = 0; index < count; index++) {
    if (at >= body.length) throw new ProtocolError('hello is cut inside its capability list');
    const size = body[at];
    const name = body.subarray(at + 1, at + 1 + size);
    at += 1 + size;
    if (name.length !== size) throw new ProtocolError('hello is cut inside a capability name');
    const text = Array.from(name, (b) => (b < 0x80 ? String.fromCharCode(b) : '\ufffd')).join('');
    if (!CAPABILITY.test(text)) throw new ProtocolError(`hello has an invalid capability name '${printable(text)}'`);
    if (text.startsWith(PUBLIC_TAG)) {
      if (index !== count - 1) throw new ProtocolError('hello has the digest of the public before its capabilities');
      const hex = text.slice(PUBLIC_TAG.length);
      if (!/^[0-9a-f]{28}$/.test(hex)) throw new ProtocolError(`hello has a malformed digest of the public '${text}'`);
      digest = Uint8Array.from(hex.match(/../g), (pair) => parseInt(pair, 16));
      continue;
    }
    capabilities.push(text);
  }
  if (at !== body.length) throw new ProtocolError('hello has trailing bytes');
  return { type: TYPE.HELLO, version, capabilities, publicDigest: digest };
}

function decodePiece(type, body, what) {
  if (body.length < 2) throw new ProtocolError(`${what} is empty`);
  const flags = body[0];
  if (flags & ~1) throw new ProtocolError(`${what} has unknown flags 0x${flags.toString(16).padStart(2, '0')}`);
  return { type, more: Boolean(flags & 1), chunk: body.subarray(1) };
}

function decodeAnswer(body) {
  if (body.length < 1) throw new ProtocolError('answer is empty');
  const decision = body[0];
  if (decision === 0) return { type: TYPE.ANSWER, accepted: false, reason: reasonText(body.subarray(1)), resumePoints: [] };
  if (decision !== 1) throw new ProtocolError(`answer has an unknown decision ${decision}`);
  if (body.length < 5) throw new ProtocolError('acceptance is too short');
  const count = view(body).getUint32(1);
  if (body.length !== 5 + count * 12) throw new ProtocolError('acceptance length does not match its resume point count');
  const resumePoints = [];
  for (let i = 0; i < count; i++) {
    resumePoints.push([view(body).getUint32(5 + i * 12), readU64(body, 9 + i * 12)]);
  }
  return { type: TYPE.ANSWER, accepted: true, reason: '', resumePoints };
}

function fixedSize(body, size, what) {
  if (body.length !== size) throw new ProtocolError(`${what} is ${body.length} bytes, expected ${size}`);
}

const DECODERS = {
  [TYPE.HELLO]: decodeHello,
  [TYPE.OFFER]: (body) => decodePiece(TYPE.OFFER, body, 'offer piece'),
  [TYPE.ANSWER]: decodeAnswer,
  [TYPE.FILE]: (body) => {
    fixedSize(body, 12, 'file start');
    return { type: TYPE.FILE, index: view(body).getUint32(0), offset: readU64(body, 4) };
  },
  [TYPE.DATA]: (body) => {
    if (body.length === 0) throw new ProtocolError('data message is empty');
    return { type: TYPE.DATA, data: body };
  },
  [TYPE.FILE_END]: (body) => {
    fixedSize(body, DIGEST_SIZE, 'file end');
    return { type: TYPE.FILE_END, digest: body };
  },
  [TYPE.DONE]: (body) => {
    if (body.length) throw new ProtocolError('done has a body');
    return { type: TYPE.DONE };
  },
  [TYPE.ACK]: (body) => {
    fixedSize(body, 16, 'ack');
    return { type: TYPE.ACK, fileCount: readU64(body, 0), totalBytes: readU64(body, 8) };
  },
  [TYPE.ERROR]: (body) => ({ type: TYPE.ERROR, reason: reasonText(body) }),
  // Decoded only so that the sessions can refuse them by name: the browser never offers
  // zstd or resume, so neither may come.
  [TYPE.ZDATA]: (body) => decodePiece(TYPE.ZDATA, body, 'compressed piece'),
  [TYPE.CHECK]: (body) => {
    fixedSize(body, DIGEST_SIZE, 'check');
    return { type: TYPE.CHECK, digest: body };
  },
};

/** True when `plaintext` starts bob's PACK stream rather than one of our messages. */
export function isPack(plaintext) {
  return plaintext.length >= 4 && plaintext[0] === 0x50 && plaintext[1] === 0x41 && plaintext[2] === 0x43 && plaintext[3] === 0x4b;
}

/**
 * Parse one record plaintext into `{type, ...fields}`. With `big` (we offered big-records)
 * a DATA message may be up to MAX_BIG_RECORD_SIZE bytes. DATA's `data` is a view, not a copy.
 */
export function decodeMessage(plaintext, { big = false } = {}) {
  const u8 = plaintext instanceof Uint8Array ? plaintext : new Uint8Array(plaintext);
  if (!(u8.length >= 1 && u8.length <= MAX_RECORD_SIZE)) {
    if (!(big && u8.length > MAX_RECORD_SIZE && u8.length <= MAX_BIG_RECORD_SIZE && u8[0] === TYPE.DATA)) {
      const largest = big ? MAX_BIG_RECORD_SIZE : MAX_RECORD_SIZE;
      throw new ProtocolError(`message of ${u8.length} bytes (must be 1..${largest}, and only DATA may be over ${MAX_RECORD_SIZE})`);
    }
  }
  const decode = DECODERS[u8[0]];
  if (!decode) {
    if (isPack(u8)) throw new ProtocolError("the peer sends bob's PACK stream, not peer-relay messages");
    throw new ProtocolError(`unknown message type 0x${u8[0].toString(16).padStart(2, '0')}`);
  }
  return decode(u8.subarray(1));
}
