// BLAKE3 (unkeyed, 32-byte digest), written from the BLAKE3 specification for one reason:
// speed in the browser. Our data phase ends every file with its BLAKE3, so the page hashes
// every byte it receives or sends, and this is the slowest stage of a browser transfer.
// The vendored @noble/hashes blake3 returns an object from each G step; Chromium 156's V8
// no longer optimises that away and runs it at about 19 MiB/s, while this file keeps the
// whole state in local variables. The tests hold it to noble's blake3 and to Python's blake3
// on every length around the block, chunk and tree boundaries.

const IV = Uint32Array.of(
  0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
);
const CHUNK_START = 1;
const CHUNK_END = 2;
const PARENT = 4;
const ROOT = 8;
const BLOCK = 64;
const CHUNK = 1024;
const LITTLE_ENDIAN = new Uint8Array(Uint32Array.of(1).buffer)[0] === 1;

/**
 * The compression function: `cv` (8 words) is replaced by the chaining value of the block
 * of 16 words at `m[mo…]`. The 7 rounds run in a loop over locals, the message words
 * permuted between rounds by renaming.
 */
function compress(cv, m, mo, counter, blockLen, flags) {
  let s0 = cv[0], s1 = cv[1], s2 = cv[2], s3 = cv[3], s4 = cv[4], s5 = cv[5], s6 = cv[6], s7 = cv[7];
  let s8 = IV[0], s9 = IV[1], s10 = IV[2], s11 = IV[3];
  let s12 = counter | 0, s13 = (counter / 0x100000000) | 0, s14 = blockLen, s15 = flags;
  let m0 = m[mo], m1 = m[mo + 1], m2 = m[mo + 2], m3 = m[mo + 3], m4 = m[mo + 4], m5 = m[mo + 5];
  let m6 = m[mo + 6], m7 = m[mo + 7], m8 = m[mo + 8], m9 = m[mo + 9], m10 = m[mo + 10];
  let m11 = m[mo + 11], m12 = m[mo + 12], m13 = m[mo + 13], m14 = m[mo + 14], m15 = m[mo + 15];
  let t;
  for (let round = 0; round < 7; round++) {
    // columns
    s0 = (s0 + s4 + m0) | 0; s12 ^= s0; s12 = (s12 >>> 16) | (s12 << 16);
    s8 = (s8 + s12) | 0; s4 ^= s8; s4 = (s4 >>> 12) | (s4 << 20);
    s0 = (s0 + s4 + m1) | 0; s12 ^= s0; s12 = (s12 >>> 8) | (s12 << 24);
    s8 = (s8 + s12) | 0; s4 ^= s8; s4 = (s4 >>> 7) | (s4 << 25);

    s1 = (s1 + s5 + m2) | 0; s13 ^= s1; s13 = (s13 >>> 16) | (s13 << 16);
    s9 = (s9 + s13) | 0; s5 ^= s9; s5 = (s5 >>> 12) | (s5 << 20);
    s1 = (s1 + s5 + m3) | 0; s13 ^= s1; s13 = (s13 >>> 8) | (s13 << 24);
    s9 = (s9 + s13) | 0; s5 ^= s9; s5 = (s5 >>> 7) | (s5 << 25);

    s2 = (s2 + s6 + m4) | 0; s14 ^= s2; s14 = (s14 >>> 16) | (s14 << 16);
    s10 = (s10 + s14) | 0; s6 ^= s10; s6 = (s6 >>> 12) | (s6 << 20);
    s2 = (s2 + s6 + m5) | 0; s14 ^= s2; s14 = (s14 >>> 8) | (s14 << 24);
    s10 = (s10 + s14) | 0; s6 ^= s10; s6 = (s6 >>> 7) | (s6 << 25);

    s3 = (s3 + s7 + m6) | 0; s15 ^= s3; s15 = (s15 >>> 16) | (s15 << 16);
    s11 = (s11 + s15) | 0; s7 ^= s11; s7 = (s7 >>> 12) | (s7 << 20);
    s3 = (s3 + s7 + m7) | 0; s15 ^= s3; s15 = (s15 >>> 8) | (s15 << 24);
    s11 = (s11 + s15) | 0; s7 ^= s11; s7 = (s7 >>> 7) | (s7 << 25);

    // diagonals
    s0 = (s0 + s5 + m8) | 0; s15 ^= s0; s15 = (s15 >>> 16) | (s15 << 16);
    s10 = (s10 + s15) | 0; s5 ^= s10; s5 = (s5 >>> 12) | (s5 << 20);
    s0 = (s0 + s5 + m9) | 0; s15 ^= s0; s15 = (s15 >>> 8) | (s15 << 24);
    s10 = (s10 + s15) | 0; s5 ^= s10; s5 = (s5 >>> 7) | (s5 << 25);

    s1 = (s1 + s6 + m10) | 0; s12 ^= s1; s12 = (s12 >>> 16) | (s12 << 16);
    s11 = (s11 + s12) | 0; s6 ^= s11; s6 = (s6 >>> 12) | (s6 << 20);
    s1 = (s1 + s6 + m11) | 0; s12 ^= s1; s12 = (s12 >>> 8) | (s12 << 24);
    s11 = (s11 + s12) | 0; s6 ^= s11; s6 = (s6 >>> 7) | (s6 << 25);

    s2 = (s2 + s7 + m12) | 0; s13 ^= s2; s13 = (s13 >>> 16) | (s13 << 16);
    s8 = (s8 + s13) | 0; s7 ^= s8; s7 = (s7 >>> 12) | (s7 << 20);
    s2 = (s2 + s7 + m13) | 0; s13 ^= s2; s13 = (s13 >>> 8) | (s13 << 24);
    s8 = (s8 + s13) | 0; s7 ^= s8; s7 = (s7 >>> 7) | (s7 << 25);

    s3 = (s3 + s4 + m14) | 0; s14 ^= s3; s14 = (s14 >>> 16) | (s14 << 16);
    s9 = (s9 + s14) | 0; s4 ^= s9; s4 = (s4 >>> 12) | (s4 << 20);
    s3 = (s3 + s4 + m15) | 0; s14 ^= s3; s14 = (s14 >>> 8) | (s14 << 24);
    s9 = (s9 + s14) | 0; s4 ^= s9; s4 = (s4 >>> 7) | (s4 << 25);

    // the message permutation: word i of the next round is word PERMUTATION[i] of this one,
    // with PERMUTATION = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
    t = m0;
    m0 = m2; m2 = m3; m3 = m10; m10 = m12; m12 = m9; m9 = m11; m11 = m5; m5 = t;
    t = m1;
    m1 = m6; m6 = m4; m4 = m7; m7 = m13; m13 = m14; m14 = m15; m15 = m8; m8 = t;
  }
  cv[0] = s0 ^ s8; cv[1] = s1 ^ s9; cv[2] = s2 ^ s10; cv[3] = s3 ^ s11;
  cv[4] = s4 ^ s12; cv[5] = s5 ^ s13; cv[6] = s6 ^ s14; cv[7] = s7 ^ s15;
}

/** On a big-endian machine, the bytes of each word of `words` reversed in place. */
function littleEndian(words, count) {
  if (LITTLE_ENDIAN) return;
  for (let i = 0; i < count; i++) {
    const w = words[i];
    words[i] = (w >>> 24) | ((w >>> 8) & 0xff00) | ((w << 8) & 0xff0000) | (w << 24);
  }
}

/** An incremental BLAKE3 hash: `update` any number of times, then `digest` once. */
export class Blake3 {
  constructor() {
    this.cv = IV.slice();           // the current chunk's chaining value
    this.chunks = 0;                // chunks finished before the current one
    this.chunkLen = 0;              // bytes of the current chunk taken, buffered ones included
    this.block = new Uint8Array(BLOCK);
    this.blockWords = new Uint32Array(this.block.buffer);
    this.blockLen = 0;              // bytes waiting in `block`
    this.scratch = null;            // aligned copies of input that cannot be read as words in place
    this.stack = new Uint32Array(54 * 8);  // chaining values of finished subtrees (2^54 chunks max)
    this.depth = 0;
    this.parent = new Uint32Array(16);
    this.finished = false;
  }

  /** Take more bytes (a Uint8Array); returns this. */
  update(bytes) {
    if (this.finished) throw new Error('this BLAKE3 is already finished');
    const length = bytes.length;
    const words = LITTLE_ENDIAN && bytes.byteOffset % 4 === 0
      ? new Uint32Array(bytes.buffer, bytes.byteOffset, length >>> 2) : null;
    let at = 0;
    while (at < length) {
      if (this.blockLen === BLOCK) {
        // a byte follows, so this is not the input's last block
        littleEndian(this.blockWords, 16);
        this.compressBlock(this.blockWords, 0);
        this.blockLen = 0;
      }
      if (this.blockLen === 0 && length - at > BLOCK) {
        // Whole blocks straight from the input, except the last: only at digest time is
        // it known whether the final block ends the input (it then takes other flags).
        const count = Math.floor((length - at - 1) / BLOCK);
        if (words && at % 4 === 0) {
          this.blocks(words, at >>> 2, count);
        } else {
          this.scratch ??= new Uint32Array(16 * 1024);
          const scratchBytes = new Uint8Array(this.scratch.buffer);
          for (let done = 0; done < count;) {
            const some = Math.min(count - done, this.scratch.length / 16);
            scratchBytes.set(bytes.subarray(at + done * BLOCK, at + (done + some) * BLOCK));
            littleEndian(this.scratch, some * 16);
            this.blocks(this.scratch, 0, some);
            done += some;
          }
        }
        at += count * BLOCK;
      }
      const take = Math.min(BLOCK - this.blockLen, length - at);
      this.block.set(bytes.subarray(at, at + take), this.blockLen);
      this.blockLen += take;
      this.chunkLen += take;
      at += take;
    }
    return this;
  }

  /** The 32-byte digest; the hash cannot be updated after it. */
  digest() {
    if (this.finished) throw new Error('this BLAKE3 is already finished');
    this.finished = true;
    this.block.fill(0, this.blockLen);
    littleEndian(this.blockWords, 16);
    let flags = CHUNK_END | (this.chunkLen <= BLOCK ? CHUNK_START : 0);
    if (this.depth === 0) flags |= ROOT;
    const out = this.cv;
    compress(out, this.blockWords, 0, this.chunks, this.blockLen, flags);
    while (this.depth > 0) this.merge(out, this.depth === 1 ? ROOT : 0);
    const digest = new Uint8Array(32);
    for (let i = 0; i < 8; i++) {
      const word = out[i];
      digest[i * 4] = word;
      digest[i * 4 + 1] = word >>> 8;
      digest[i * 4 + 2] = word >>> 16;
      digest[i * 4 + 3] = word >>> 24;
    }
    return digest;
  }

  /** `count` whole blocks of words from `m[mo…]`, none of them the input's last. */
  blocks(m, mo, count) {
    for (let i = 0; i < count; i++) {
      this.chunkLen += BLOCK;
      this.compressBlock(m, mo + i * 16);
    }
  }

  /** Compress a block that is not the input's last (`chunkLen` already counts it). */
  compressBlock(m, mo) {
    const first = this.chunkLen === BLOCK ? CHUNK_START : 0;
    const last = this.chunkLen === CHUNK ? CHUNK_END : 0;
    compress(this.cv, m, mo, this.chunks, BLOCK, first | last);
    if (last) this.endChunk();
  }

  /** The current chunk is complete and not the last: fold its chaining value into the tree. */
  endChunk() {
    const cv = this.cv;
    // after 2^k·n chunks, the k subtrees on top of the stack pair up
    for (let total = ++this.chunks; total % 2 === 0; total /= 2) this.merge(cv, 0);
    this.stack.set(cv, this.depth * 8);
    this.depth += 1;
    cv.set(IV);
    this.chunkLen = 0;
  }

  /** `cv` becomes the parent of the subtree on top of the stack (popped) and itself. */
  merge(cv, flags) {
    this.depth -= 1;
    this.parent.set(this.stack.subarray(this.depth * 8, this.depth * 8 + 8), 0);
    this.parent.set(cv, 8);
    cv.set(IV);
    compress(cv, this.parent, 0, 0, BLOCK, PARENT | flags);
  }
}
