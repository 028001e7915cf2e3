// BLAKE3 of each file, computed in Workers (hash-worker.js, lib/blake3.js) while the file
// streams, so that hashing overlaps decryption, network and disk on the main thread
// and never blocks the page. Each byte is hashed once. `update` returns a promise that
// waits only when too many bytes are in flight: that is the backpressure keeping memory flat.

const IN_FLIGHT = 8 * 1024 * 1024;
const POOL_SIZE = Math.max(1, Math.min(4, (globalThis.navigator?.hardwareConcurrency ?? 2) - 1));

let pool = null;
let nextId = 1;

class Slot {
  constructor() {
    this.worker = new Worker(new URL('../hash-worker.js', import.meta.url), { type: 'module' });
    this.hashers = new Map();
    this.open = 0;
    this.worker.onmessage = ({ data }) => this.hashers.get(data.id)?.onReply(data);
    this.worker.onerror = (event) => {
      event.preventDefault();
      const error = new Error(`the hashing worker failed: ${event.message || 'it could not start'}`);
      for (const hasher of this.hashers.values()) hasher.onFailure(error);
    };
  }
}

function slot() {
  if (!pool) pool = Array.from({ length: POOL_SIZE }, () => new Slot());
  // The least busy worker: files hashed side by side use different cores.
  return pool.reduce((best, candidate) => (candidate.open < best.open ? candidate : best));
}

export class Hasher {
  constructor() {
    this.id = nextId++;
    this.slot = slot();
    this.slot.open += 1;
    this.slot.hashers.set(this.id, this);
    this.inFlight = 0;
    this.length = 0;
    this.waiters = [];
    this.failure = null;
    this.result = null;
    this.closed = false;
  }

  /**
   * Hash `bytes` next. Resolves at once unless IN_FLIGHT bytes wait for the worker.
   * With `transfer`, a Uint8Array that owns its whole buffer is handed over (the caller
   * must not use it again); otherwise it is copied.
   */
  update(bytes, { transfer = false } = {}) {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) throw new Error('this hash is already finished');
    if (!bytes.length) return Promise.resolve();
    const owned = transfer && bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    const copy = owned ? bytes : bytes.slice();
    this.inFlight += copy.length;
    this.length += copy.length;
    this.slot.worker.postMessage({ id: this.id, op: 'update', bytes: copy }, [copy.buffer]);
    if (this.inFlight < IN_FLIGHT) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** The 32-byte digest of everything updated, once the worker is through. */
  digest() {
    if (this.failure) return Promise.reject(this.failure);
    if (!this.closed) {
      this.closed = true;
      this.result = new Promise((resolve, reject) => { this.finish = { resolve, reject }; });
      this.slot.worker.postMessage({ id: this.id, op: 'digest' });
    }
    return this.result;
  }

  /** Forget this hash (a failed transfer); pending promises reject. */
  abort() {
    if (this.failure) return;
    this.slot.worker.postMessage({ id: this.id, op: 'drop' });
    this.onFailure(new Error('hashing was abandoned'));
  }

  onReply(reply) {
    if (reply.op === 'updated') {
      this.inFlight -= reply.size;
      while (this.inFlight < IN_FLIGHT && this.waiters.length) this.waiters.shift().resolve();
    } else if (reply.op === 'digest') {
      this.release();
      this.finish.resolve(new Uint8Array(reply.digest));
    } else if (reply.op === 'error') {
      this.onFailure(new Error(`hashing failed: ${reply.message}`));
    }
  }

  onFailure(error) {
    this.failure = error;
    this.release();
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    if (this.finish) this.finish.reject(error);
  }

  release() {
    if (this.slot.hashers.delete(this.id)) this.slot.open -= 1;
  }
}
