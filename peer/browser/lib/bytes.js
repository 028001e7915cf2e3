// Byte helpers shared by every module of the browser peer: hex, UTF-8, joining, comparing,
// and the big-endian integers of the wire formats.
//
// 64-bit integers: `u64` accepts a Number (a safe integer) or a BigInt; `readU64` returns a
// Number and throws a RangeError above Number.MAX_SAFE_INTEGER (file sizes and offsets never
// get there), `readU64n` returns a BigInt for fields a stranger may set to anything (spoke's
// iteration count).

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));
const encoder = new TextEncoder();

export function hex(u8) {
  let out = '';
  for (let i = 0; i < u8.length; i++) out += HEX[u8[i]];
  return out;
}

export function fromHex(text) {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) {
    throw new TypeError('not an even number of hexadecimal digits');
  }
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(i * 2, 2), 16);
  return out;
}

export function concat(...parts) {
  let size = 0;
  for (const part of parts) size += part.length;
  const out = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

export function utf8(text) {
  return encoder.encode(text);
}

/** Text from bytes; invalid UTF-8 becomes U+FFFD, as for anything shown to a user. */
export function fromUtf8(u8) {
  return new TextDecoder('utf-8').decode(u8);
}

/** Equal contents; over equal lengths the time does not depend on where they differ. */
export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

function checkUint(value, bits) {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw new RangeError(`${value} is not an unsigned ${bits}-bit integer`);
  }
}

export function u16(value) {
  checkUint(value, 16);
  return Uint8Array.of(value >>> 8, value & 0xff);
}

export function u32(value) {
  checkUint(value, 32);
  return Uint8Array.of(value >>> 24, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff);
}

export function u64(value) {
  let big = value;
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`${value} is not a u64`);
    big = BigInt(value);
  }
  if (typeof big !== 'bigint' || big < 0n || big >= 1n << 64n) throw new RangeError(`${value} is not a u64`);
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, big);
  return out;
}

function view(u8) {
  return new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
}

export function readU16(u8, offset = 0) {
  return view(u8).getUint16(offset);
}

export function readU32(u8, offset = 0) {
  return view(u8).getUint32(offset);
}

export function readU64n(u8, offset = 0) {
  return view(u8).getBigUint64(offset);
}

export function readU64(u8, offset = 0) {
  const value = readU64n(u8, offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`u64 ${value} is too large`);
  return Number(value);
}

/** Little-endian bytes to a BigInt, and back (curve field elements and scalars). */
export function leToBigInt(u8) {
  let value = 0n;
  for (let i = u8.length - 1; i >= 0; i--) value = (value << 8n) | BigInt(u8[i]);
  return value;
}

export function bigIntToLe(value, size) {
  const out = new Uint8Array(size);
  for (let i = 0; i < size; i++) {
    out[i] = Number(value & 0xffn);
    value >>= 8n;
  }
  return out;
}
