// The record layer of the secure room (docs/protocol.md §7), sans I/O: a Sealer makes the
// records of one direction, an Opener frames the other direction's bytes, fed in any pieces,
// and opens its records. AES-256-GCM is WebCrypto's, so sealing and opening are async; each
// record's sequence number is taken when it is framed or sealed, so several may be in flight
// and still carry the right nonces.
//
// A record: length ‖ ciphertext ‖ tag (16). Length is 2 bytes (1..0x7fff) or, once both of
// our peers agreed on big records, 4 bytes 0x80000000|n for 0x7fff < n ≤ 256 KiB. Nonce =
// base (sub-key bytes 32..43) ‖ sequence as u64 big-endian, 20 bytes; AAD = 00 01 ‖ the
// length bytes as written. The raw bytes ff ff ff ff are the close marker.

import { u64 } from './bytes.js';

export const MAX_RECORD_SIZE = 0x7fff; // bob's reader holds 2 + 0x7fff + 16 bytes
export const MAX_BIG_RECORD_SIZE = 256 * 1024;
export const TAG_SIZE = 16;
export const CLOSE = Uint8Array.of(0xff, 0xff, 0xff, 0xff);
export const CLOSED = Symbol('closed');
const BIG_FLAG = 0x80000000;
const AAD_PREFIX = [0x00, 0x01]; // spoke's version 1, big-endian

export class RecordError extends Error {}

/** The AES key (sub-key bytes 0..31) and base nonce (32..43) of one direction. */
export async function importSubKey(subKey) {
  if (!(subKey instanceof Uint8Array) || subKey.length !== 64) throw new RangeError('a sub-key is 64 bytes');
  const key = await crypto.subtle.importKey('raw', subKey.slice(0, 32), { name: 'AES-GCM' }, false, ['encrypt', 'decrypt']);
  return { key, base: subKey.slice(32, 44) };
}

function nonceFor(base, sequence) {
  const nonce = new Uint8Array(20);
  nonce.set(base);
  nonce.set(u64(sequence), 12);
  return nonce;
}

function aadFor(header) {
  const aad = new Uint8Array(2 + header.length);
  aad.set(AAD_PREFIX);
  aad.set(header, 2);
  return aad;
}

/** The length header of a record of `size` plaintext bytes. */
export function recordHeader(size, big) {
  if (size >= 1 && size <= MAX_RECORD_SIZE) return Uint8Array.of(size >>> 8, size & 0xff);
  if (big && size > MAX_RECORD_SIZE && size <= MAX_BIG_RECORD_SIZE) {
    const n = (BIG_FLAG | size) >>> 0;
    return Uint8Array.of(n >>> 24, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  }
  const largest = big ? MAX_BIG_RECORD_SIZE : MAX_RECORD_SIZE;
  throw new RangeError(`record plaintext must be 1..${largest} bytes, got ${size}`);
}

export class Sealer {
  static async create(subKey) {
    const { key, base } = await importSubKey(subKey);
    return new Sealer(key, base);
  }

  constructor(key, base) {
    this._key = key;
    this._base = base;
    this.sequence = 0;
    /** Set once the peer agreed to big records (the `big-records` feature). */
    this.big = false;
  }

  /** One whole record (header, ciphertext, tag) for 1..0x7fff bytes, more when big. A bad
   * size throws at once; the sequence number is taken now, so seals in flight keep order. */
  seal(plaintext) {
    const header = recordHeader(plaintext.length, this.big);
    const nonce = nonceFor(this._base, this.sequence);
    this.sequence += 1;
    const params = { name: 'AES-GCM', iv: nonce, additionalData: aadFor(header), tagLength: 128 };
    return crypto.subtle.encrypt(params, this._key, plaintext).then((buffer) => {
      const record = new Uint8Array(header.length + buffer.byteLength);
      record.set(header);
      record.set(new Uint8Array(buffer), header.length);
      return record;
    });
  }
}

/**
 * Frames one direction from arbitrarily cut input (`feed`), hands out whole sealed records
 * (`next`), opens them (`open`). After the close marker it returns CLOSED for good and
 * ignores further input; `eof` says whether the end of the stream cut a record.
 */
export class Opener {
  static async create(subKey) {
    const { key, base } = await importSubKey(subKey);
    return new Opener(key, base);
  }

  constructor(key, base) {
    this._key = key;
    this._base = base;
    this.sequence = 0;
    /** Set once we told the peer we take big records. */
    this.big = false;
    this._chunks = [];
    this._offset = 0; // bytes of _chunks[0] already consumed
    this._buffered = 0;
    this._closed = false;
    this._failure = null;
  }

  get closed() {
    return this._closed;
  }

  get buffered() {
    return this._buffered;
  }

  feed(data) {
    if (this._closed || !data.length) return;
    this._chunks.push(data);
    this._buffered += data.length;
  }

  _peek(count) {
    const out = new Uint8Array(count);
    let at = 0;
    let offset = this._offset;
    for (const chunk of this._chunks) {
      const piece = chunk.subarray(offset, offset + count - at);
      out.set(piece, at);
      at += piece.length;
      offset = 0;
      if (at === count) break;
    }
    return out;
  }

  _take(count) {
    const first = this._chunks[0];
    let out;
    if (first.length - this._offset >= count) {
      out = first.subarray(this._offset, this._offset + count); // no copy in the usual case
      this._offset += count;
    } else {
      // A record cut across pieces is gathered in one reused buffer: it only has to live
      // until `open`, whose decrypt copies its input at once.
      if (!this._scratch || this._scratch.length < count) this._scratch = new Uint8Array(Math.max(count, MAX_BIG_RECORD_SIZE + TAG_SIZE));
      out = this._scratch.subarray(0, count);
      let at = 0;
      while (at < count) {
        const chunk = this._chunks[0];
        const piece = chunk.subarray(this._offset, this._offset + count - at);
        out.set(piece, at);
        at += piece.length;
        this._offset += piece.length;
        if (this._offset === chunk.length) {
          this._chunks.shift();
          this._offset = 0;
        }
      }
    }
    if (this._chunks.length && this._offset === this._chunks[0].length) {
      this._chunks.shift();
      this._offset = 0;
    }
    this._buffered -= count;
    return out;
  }

  _fail(message) {
    this._failure = new RecordError(message);
    throw this._failure;
  }

  /**
   * The next sealed record as { sequence, header, sealed } (open it with `open` before the
   * next call: `sealed` may be a view of a buffer that call reuses), CLOSED after the close
   * marker, or null until more bytes come. A bad length throws, for good.
   */
  next() {
    if (this._failure) throw this._failure;
    if (this._closed) return CLOSED;
    if (this._buffered < 2) return null;
    const two = this._peek(2);
    let size = (two[0] << 8) | two[1];
    if (size === 0xffff) {
      // Only the marker's first two bytes matter; the rest and anything after is dropped.
      this._closed = true;
      this._chunks = [];
      this._offset = this._buffered = 0;
      return CLOSED;
    }
    let headerSize = 2;
    if (size & 0x8000 && this.big) {
      if (this._buffered < 4) return null;
      const four = this._peek(4);
      size = (((four[0] << 24) >>> 0) + (four[1] << 16) + (four[2] << 8) + four[3]) - BIG_FLAG;
      if (size <= MAX_RECORD_SIZE || size > MAX_BIG_RECORD_SIZE) this._fail(`invalid big record length 0x${size.toString(16)}`);
      headerSize = 4;
    } else if (size < 1 || size > MAX_RECORD_SIZE) {
      this._fail(`invalid record length 0x${size.toString(16).padStart(4, '0')}`);
    }
    if (this._buffered < headerSize + size + TAG_SIZE) return null;
    const header = this._take(headerSize).slice();
    const sealed = this._take(size + TAG_SIZE);
    const sequence = this.sequence;
    this.sequence += 1;
    return { sequence, header, sealed };
  }

  /** The plaintext of a record from `next`; RecordError if it fails authentication. */
  async open({ sequence, header, sealed }) {
    try {
      return new Uint8Array(await crypto.subtle.decrypt(
        { name: 'AES-GCM', iv: nonceFor(this._base, sequence), additionalData: aadFor(header), tagLength: 128 },
        this._key, sealed));
    } catch {
      throw new RecordError(`record ${sequence} failed authentication`);
    }
  }

  /** The stream ended: fine at a record boundary or after the marker, else a cut record. */
  eof() {
    if (!this._closed && this._buffered) {
      throw new RecordError(`stream ended inside a record, ${this._buffered} bytes left over`);
    }
  }
}
