export { ed25519 } from '@noble/curves/ed25519.js';
export { blake2b } from '@noble/hashes/blake2.js';
export { blake3 } from '@noble/hashes/blake3.js';
export { sha256 } from '@noble/hashes/sha2.js';
export { hmac } from '@noble/hashes/hmac.js';
