// spoke, the password-authenticated key exchange of the handshake (docs/protocol.md §5), as
// pure synchronous functions over bytes: the handshake machines (handshake.js) own the flow.
//
// Every curve operation reproduces libsodium's, rejections included, because bob and our
// Python peers use libsodium: `fromUniform` is crypto_core_ed25519_from_uniform, `pointAdd`/
// `pointSub` are crypto_core_ed25519_add/_sub (they take any decodable point), and the four
// scalar multiplications refuse what crypto_scalarmult_ed25519* refuse (a non-canonical or
// small-order point, one outside the prime-order subgroup, a zero scalar or an identity
// result). The comments mark spoke's quirks: a "fix" there breaks interop silently.

import { blake2b, ed25519, hmac, sha256 } from '../vendor/noble.js';
import {
  bigIntToLe, concat, equalBytes, hex, leToBigInt, readU16, readU64n, u16, u64, utf8,
} from './bytes.js';

export const ALGORITHM_PBKDF2 = 2;
export const HASH_SHA256 = 4;
export const CIPHER_AES256_GCM = 0;
export const CIPHER_CHACHA20_POLY1305 = 2;
const KNOWN_CIPHERS = [0, 1, 2];
export const DEFAULT_ITERATIONS = 4096; // what our senders advertise
export const MAX_ITERATIONS = 100000; // a stranger's public could ask for 2^63
export const BOB_ITERATIONS = 16;
export const PUBLIC_SIZE = 34;
export const SALT_SIZE = 16;
export const POINT_SIZE = 32;
export const SUB_KEY_SIZE = 64;
const STRETCH_SIZE = 128;

// Spoke_failure codes (the body of packet 0d).
export const FAILURE_BAD_POINT = 0;
export const FAILURE_BAD_CLIENT_VALIDATOR = 1; // the sender's proof (06) did not match: wrong code
export const FAILURE_BAD_SERVER_VALIDATOR = 2; // the receiver's proof (05) did not match
export const FAILURE_BAD_PUBLIC = 3;

export class SpokeError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// --- the public -------------------------------------------------------------------------

/** The 34 bytes a sender advertises (§5.1); `iterations` may be a Number or a BigInt. */
export function encodePublic({ version = 1, algorithm = ALGORITHM_PBKDF2, iterations, cipher0, cipher1, hash = HASH_SHA256, salt }) {
  if (!(salt instanceof Uint8Array) || salt.length !== SALT_SIZE) throw new RangeError(`salt must be ${SALT_SIZE} bytes`);
  return concat(u16(version), u16(algorithm), u64(iterations), u16(cipher0), u16(cipher1), u16(hash), salt);
}

/**
 * Parse and check a public from the wire; SpokeError(3) for one we would not run. Like bob
 * we ignore the version; unlike bob we refuse iteration counts outside 1..MAX_ITERATIONS.
 */
export function decodePublic(bytes) {
  if (!(bytes instanceof Uint8Array) || bytes.length !== PUBLIC_SIZE) {
    throw new SpokeError(FAILURE_BAD_PUBLIC, `public is ${bytes && bytes.length} bytes, expected ${PUBLIC_SIZE}`);
  }
  const iterations = readU64n(bytes, 4);
  const pub = {
    version: readU16(bytes, 0),
    algorithm: readU16(bytes, 2),
    cipher0: readU16(bytes, 12),
    cipher1: readU16(bytes, 14),
    hash: readU16(bytes, 16),
    salt: bytes.slice(18),
    bytes: bytes.slice(),
  };
  if (pub.algorithm !== ALGORITHM_PBKDF2) throw new SpokeError(FAILURE_BAD_PUBLIC, `unknown password algorithm ${pub.algorithm}`);
  if (pub.hash !== HASH_SHA256) throw new SpokeError(FAILURE_BAD_PUBLIC, `unknown hash ${pub.hash}`);
  for (const cipher of [pub.cipher0, pub.cipher1]) {
    if (!KNOWN_CIPHERS.includes(cipher)) throw new SpokeError(FAILURE_BAD_PUBLIC, `unknown cipher ${cipher}`);
  }
  if (iterations < 1n || iterations > BigInt(MAX_ITERATIONS)) {
    throw new SpokeError(FAILURE_BAD_PUBLIC, `iteration count ${iterations} outside 1..${MAX_ITERATIONS}`);
  }
  pub.iterations = Number(iterations);
  return pub;
}

/**
 * bob's sender: its fixed 16 iterations and a cipher1 that cannot carry records. Only both
 * together say bob: the cipher ids are not bound by the keys, so a relay could rewrite them.
 */
export function isBobPublic(pub) {
  return pub.iterations === BOB_ITERATIONS && pub.cipher1 !== CIPHER_AES256_GCM;
}

/** A fresh salt, led by the nameplate (u16 big-endian, §10.1) when the code has one. */
export function saltFor(nameplate, randomBytes = defaultRandomBytes) {
  const salt = randomBytes(SALT_SIZE);
  if (nameplate !== null && nameplate !== undefined) salt.set(u16(nameplate), 0);
  return salt;
}

/** Whether an encoded public carries `nameplate` in the first two bytes of its salt. */
export function saltMatches(publicBytes, nameplate) {
  return publicBytes.length === PUBLIC_SIZE && readU16(publicBytes, 18) === nameplate;
}

function defaultRandomBytes(size) {
  return crypto.getRandomValues(new Uint8Array(size));
}

// --- the password stretch ---------------------------------------------------------------

/**
 * PBKDF2-HMAC-SHA256 to 128 bytes, except that the block index appended to the salt is
 * little-endian (spoke writes it in the machine's order), so WebCrypto's PBKDF2 cannot be
 * used. The key's pads are hashed once and cloned for each of the 4 × iterations HMACs.
 */
export function stretch(password, salt, iterations) {
  if (!Number.isInteger(iterations) || iterations < 1) throw new RangeError('PBKDF2 needs at least one iteration');
  const keyed = hmac.create(sha256, password);
  let work;
  const out = new Uint8Array(STRETCH_SIZE);
  const u = new Uint8Array(32);
  for (let block = 0; block < STRETCH_SIZE / 32; block++) {
    const index = Uint8Array.of(block + 1, 0, 0, 0); // the quirk: little-endian
    work = keyed._cloneInto(work);
    work.update(concat(salt, index));
    work.digestInto(u);
    const acc = u.slice();
    for (let i = 1; i < iterations; i++) {
      work = keyed._cloneInto(work);
      work.update(u);
      work.digestInto(u);
      for (let j = 0; j < 32; j++) acc[j] ^= u[j];
    }
    out.set(acc, block * 32);
  }
  return out;
}

// --- curve operations, as libsodium does them ------------------------------------------

const Point = ed25519.Point;
const Fp = Point.Fp;
const P = Fp.ORDER;
const L = Point.Fn.ORDER;
const MONTGOMERY_A = 486662n;
const IDENTITY = Point.ZERO.toBytes();

function badPoint(what) {
  return new SpokeError(FAILURE_BAD_POINT, `${what}: not a point of the prime-order group`);
}

/** libsodium's ge25519_frombytes: any y below 2^255 (reduced mod p), any sign; only a y
 * with no x on the curve fails. This is all crypto_core_ed25519_add/_sub ask. */
function decodeLoose(bytes, what) {
  if (!(bytes instanceof Uint8Array) || bytes.length !== POINT_SIZE) throw badPoint(`${what} is not ${POINT_SIZE} bytes`);
  const y = leToBigInt(bytes.subarray(0, 31)) | (BigInt(bytes[31] & 0x7f) << 248n);
  const reduced = bigIntToLe(y % P, POINT_SIZE);
  reduced[31] |= bytes[31] & 0x80;
  try {
    return Point.fromBytes(reduced, true);
  } catch {
    throw badPoint(what);
  }
}

/** What crypto_scalarmult_ed25519* accept as a point: canonical encoding, not of small
 * order, on the curve and in the prime-order subgroup. */
function decodeStrict(bytes, what) {
  if (!(bytes instanceof Uint8Array) || bytes.length !== POINT_SIZE) throw badPoint(`${what} is not ${POINT_SIZE} bytes`);
  const y = leToBigInt(bytes.subarray(0, 31)) | (BigInt(bytes[31] & 0x7f) << 248n);
  if (y >= P) throw badPoint(`${what} is not canonical`);
  let point;
  try {
    point = Point.fromBytes(bytes, false);
  } catch {
    throw badPoint(what); // off the curve, or x = 0 with the sign bit (small order anyway)
  }
  if (point.isSmallOrder() || !point.isTorsionFree()) throw badPoint(what);
  return point;
}

function scalarOf(n, clamp) {
  if (!(n instanceof Uint8Array) || n.length !== 32) throw new RangeError('a scalar is 32 bytes');
  const t = n.slice();
  if (clamp) t[0] &= 248;
  t[31] &= 127;
  if (clamp) t[31] |= 64;
  return leToBigInt(t) % L;
}

function multiply(n, point, clamp, what) {
  // libsodium refuses an all-zero scalar (before clamping) and an identity result.
  const s = scalarOf(n, clamp);
  if (n.every((b) => b === 0) || s === 0n) throw badPoint(`${what}: the result is the identity`);
  const result = point.multiply(s);
  if (result.is0()) throw badPoint(`${what}: the result is the identity`);
  return result.toBytes();
}

export function scalarmultBase(n) {
  return multiply(n, Point.BASE, true, 'base multiplication');
}

export function scalarmultBaseNoclamp(n) {
  return multiply(n, Point.BASE, false, 'base multiplication');
}

export function scalarmult(n, p, what = 'point') {
  return multiply(n, decodeStrict(p, what), true, what);
}

export function scalarmultNoclamp(n, p, what = 'point') {
  return multiply(n, decodeStrict(p, what), false, what);
}

export function pointAdd(p, q, what = 'point') {
  return decodeLoose(p, what).add(decodeLoose(q, what)).toBytes();
}

export function pointSub(p, q, what = 'point') {
  return decodeLoose(p, what).subtract(decodeLoose(q, what)).toBytes();
}

/**
 * crypto_core_ed25519_from_uniform: Elligator 2 onto Curve25519 from the low 255 bits, the
 * birational map to Edwards y, the top bit of the input as the sign of x, then the cofactor
 * cleared (times 8), so the result is always in the prime-order subgroup (maybe the identity).
 */
export function fromUniform(r) {
  if (!(r instanceof Uint8Array) || r.length !== 32) throw new RangeError('from_uniform takes 32 bytes');
  const sign = r[31] & 0x80;
  const t = leToBigInt(r.subarray(0, 31)) | (BigInt(r[31] & 0x7f) << 248n);
  const rr = Fp.create(t);
  const x1 = Fp.neg(Fp.div(MONTGOMERY_A, Fp.add(Fp.ONE, Fp.mul(2n, Fp.sqr(rr)))));
  const gx1 = Fp.add(Fp.add(Fp.mul(Fp.sqr(x1), x1), Fp.mul(MONTGOMERY_A, Fp.sqr(x1))), x1);
  const notSquare = Fp.pow(gx1, (P - 1n) / 2n) === P - 1n;
  const u = notSquare ? Fp.sub(Fp.neg(x1), MONTGOMERY_A) : x1;
  // u = 0 and u = -1 map to points of order 2 or 4, which clearing the cofactor sends to the
  // identity (libsodium gets there too); their Edwards y has no usable division.
  if (u === 0n || u === P - 1n) return IDENTITY.slice();
  const yEd = Fp.div(Fp.sub(u, Fp.ONE), Fp.add(u, Fp.ONE));
  const encoded = bigIntToLe(yEd, POINT_SIZE);
  encoded[31] |= sign;
  return Point.fromBytes(encoded, false).clearCofactor().toBytes();
}

// --- scalars ------------------------------------------------------------------------------

/** spoke's mask: bit 254 is left alone, unlike X25519 clamping. */
export function maskScalar(raw) {
  const s = raw.slice();
  s[0] &= 248;
  s[31] &= 127;
  return s;
}

export function randomScalar(randomBytes = defaultRandomBytes) {
  for (;;) {
    const s = maskScalar(randomBytes(32));
    if (s.some((b) => b !== 0)) return s;
  }
}

function checkScalar(s) {
  if (!(s instanceof Uint8Array) || s.length !== 32) throw new RangeError('a scalar is 32 bytes');
  if (s.every((b) => b === 0)) throw new RangeError('a scalar must not be zero');
  return s;
}

// --- key schedule -------------------------------------------------------------------------

const SUB_KEY_LABEL = concat(utf8('SPOKE'), new Uint8Array(11));

/** BLAKE2b-512 of the plain transcript; the version prefix is little-endian (01 00) and the
 * identities are (receiver, sender) on both sides. */
export function deriveMain({ clientIdentity, serverIdentity, x, y, z, hK, v }) {
  return blake2b(concat(Uint8Array.of(1, 0), clientIdentity, serverIdentity, x, y, z, hK, v), { dkLen: 64 });
}

/** Sub-key i: BLAKE2b-512 keyed with main over "SPOKE", zeros, i as a little-endian u64, zeros. */
export function deriveSubKey(main, index) {
  const message = concat(SUB_KEY_LABEL, bigIntToLe(BigInt(index), 8), new Uint8Array(8));
  return blake2b(message, { key: main, dkLen: SUB_KEY_SIZE });
}

function keysFrom(main, pub) {
  return {
    senderToReceiver: deriveSubKey(main, 0),
    receiverToSender: deriveSubKey(main, 1),
    ciphers: [pub.cipher0, pub.cipher1],
  };
}

// --- the exchange -------------------------------------------------------------------------

/** M, N, h_K, h_L from the stretched password (§5.2). */
export function splitStretch(mnkl) {
  return {
    m: fromUniform(mnkl.subarray(0, 32)),
    n: fromUniform(mnkl.subarray(32, 64)),
    hK: mnkl.slice(64, 96),
    hL: mnkl.slice(96, 128),
  };
}

/**
 * Sender, once per session: the public and the secret that answers every receiver.
 * L = h_L·B uses the *clamping* base multiplication, unlike the rest of the exchange.
 */
export function generate(password, { salt, iterations = DEFAULT_ITERATIONS, ciphers = [0, 0] }) {
  const bytes = encodePublic({ iterations, cipher0: ciphers[0], cipher1: ciphers[1], salt });
  const pub = decodePublic(bytes);
  const { m, n, hK, hL } = splitStretch(stretch(password, salt, pub.iterations));
  return { public: pub, m, n, hK, l: scalarmultBase(hL) };
}

/** Receiver: its X = x·B + M for a sender's public (the body of 07 with its identity). */
export function clientHello(password, pub, { scalar } = {}) {
  const { m, n, hK, hL } = splitStretch(stretch(password, pub.salt, pub.iterations));
  const x = scalar ? checkScalar(scalar) : randomScalar();
  const bigX = pointAdd(scalarmultBaseNoclamp(x), m);
  return { state: { public: pub, x, bigX, n, hK, hL }, x: bigX };
}

/** Sender: from a receiver's X, Y and its proof sub(2) (packet 06); SpokeError(0) on a bad X. */
export function serverCompute(secret, bigX, { clientIdentity, serverIdentity, scalar } = {}) {
  if (!(bigX instanceof Uint8Array) || bigX.length !== POINT_SIZE) throw badPoint('X');
  const y = scalar ? checkScalar(scalar) : randomScalar();
  const bigY = pointAdd(scalarmultBaseNoclamp(y), secret.n);
  const z = scalarmultNoclamp(y, pointSub(bigX, secret.m, 'X'), 'X - M');
  const v = scalarmultNoclamp(y, secret.l, 'L');
  const main = deriveMain({ clientIdentity, serverIdentity, x: bigX, y: bigY, z, hK: secret.hK, v });
  return {
    state: { expected: deriveSubKey(main, 3), keys: keysFrom(main, secret.public) },
    y: bigY,
    validator: deriveSubKey(main, 2),
  };
}

/**
 * Receiver: from the sender's Y and proof, the keys and our proof sub(3) (packet 05).
 * SpokeError(0) on a bad Y, SpokeError(1) when the proof does not match: a wrong code.
 * V = h_L·(Y − N) with the clamping multiplication, to match L = h_L·B.
 */
export function clientCompute(state, bigY, validator, { clientIdentity, serverIdentity }) {
  if (!(bigY instanceof Uint8Array) || bigY.length !== POINT_SIZE) throw badPoint('Y');
  const g = pointSub(bigY, state.n, 'Y');
  const z = scalarmultNoclamp(state.x, g, 'Y - N');
  const v = scalarmult(state.hL, g, 'Y - N');
  const main = deriveMain({ clientIdentity, serverIdentity, x: state.bigX, y: bigY, z, hK: state.hK, v });
  if (!(validator instanceof Uint8Array) || !equalBytes(deriveSubKey(main, 2), validator)) {
    throw new SpokeError(FAILURE_BAD_CLIENT_VALIDATOR, "the sender's proof does not match our code");
  }
  return { keys: keysFrom(main, state.public), validator: deriveSubKey(main, 3) };
}

/** Sender: the keys, if the receiver's proof (packet 05) matches; else SpokeError(2). */
export function serverFinalize(state, validator) {
  if (!(validator instanceof Uint8Array) || !equalBytes(state.expected, validator)) {
    throw new SpokeError(FAILURE_BAD_SERVER_VALIDATOR, "the receiver's proof does not match our code");
  }
  return state.keys;
}

// --- what users and the data phase see -----------------------------------------------------

function person(text) {
  const out = new Uint8Array(16); // BLAKE2b's personalization, zero-padded
  out.set(utf8(text));
  return out;
}

const CHECK_PERSON = person('peer-relay:check');
const PUB_PERSON = person('peer-relay pub');

/** What both peers show for their users to compare: BLAKE2b-64 of sub(0), as 4 × 4 hex. */
export function verificationString(sub0) {
  if (sub0.length < 32) throw new RangeError('expected a session sub-key');
  const digest = hex(blake2b(sub0, { dkLen: 8, personalization: CHECK_PERSON }));
  return digest.match(/.{4}/g).join('-');
}

/** The 28 hex digits of the HELLO's `pub-` item: a 14-byte BLAKE2b of the public. */
export function publicDigest(publicBytes) {
  return hex(blake2b(publicBytes, { dkLen: 14, personalization: PUB_PERSON }));
}
