// BLAKE3 off the main thread: the page posts a file's bytes as they stream and asks for
// the digest at its end. Several hashes may be open at once (one per id), so one worker
// serves a whole transfer. Every update is acknowledged with its size: the page keeps a
// bounded number of bytes in flight, so memory stays flat while this is the slowest stage.

import { Blake3 } from './lib/blake3.js';

const open = new Map();

self.onmessage = ({ data }) => {
  const { id, op } = data;
  try {
    if (op === 'update') {
      if (!open.has(id)) open.set(id, new Blake3());
      open.get(id).update(data.bytes);
      self.postMessage({ id, op: 'updated', size: data.bytes.length });
    } else if (op === 'digest') {
      const digest = (open.get(id) ?? new Blake3()).digest();
      open.delete(id);
      self.postMessage({ id, op: 'digest', digest }, [digest.buffer]);
    } else if (op === 'drop') {
      open.delete(id);
    }
  } catch (error) {
    open.delete(id);
    self.postMessage({ id, op: 'error', message: String(error && error.message || error) });
  }
};
