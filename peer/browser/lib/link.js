// A WebSocket to the relay as a byte stream (docs/protocol.md §2): binary messages whose
// boundaries mean nothing. Writes made in the same turn of the event loop go out as one
// message (at most 1 MiB, the relay's limit), and `send` waits while more than HIGH_WATER
// bytes are queued in the browser, so a fast producer cannot fill memory.

export const HIGH_WATER = 4 * 1024 * 1024;
export const MAX_MESSAGE = 1024 * 1024;
export const LOST = 'the connection to the relay was lost';
// The browser says 1005 when the Close frame had no code; the relay ends with 1000.
const CLEAN_CODES = new Set([1000, 1001, 1005]);

export class LinkError extends Error {}

function abortError(signal) {
  return signal.reason instanceof Error ? signal.reason : new DOMException('cancelled', 'AbortError');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class Link {
  /** Connect; rejects with LinkError if the relay cannot be reached, or the abort reason. */
  static open(url, { signal } = {}) {
    return new Promise((resolve, reject) => {
      if (signal && signal.aborted) {
        reject(abortError(signal));
        return;
      }
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (error) {
        reject(new LinkError(`cannot connect to ${url}: ${error.message}`));
        return;
      }
      ws.binaryType = 'arraybuffer';
      const link = new Link(ws, signal);
      const fail = () => {
        link._forget();
        reject(signal && signal.aborted ? abortError(signal) : new LinkError(`could not reach the relay at ${new URL(url).host}`));
      };
      ws.addEventListener('open', () => {
        ws.removeEventListener('close', fail);
        resolve(link);
      }, { once: true });
      ws.addEventListener('close', fail, { once: true });
    });
  }

  constructor(ws, signal) {
    this._ws = ws;
    this._signal = signal;
    this._queue = [];
    this._waiter = null;
    this._end = null; // { clean, error } once the socket closed
    this._pending = [];
    this._flushing = null;
    this.bytesReceived = 0;
    this.bytesSent = 0;
    ws.addEventListener('message', (event) => {
      if (!(event.data instanceof ArrayBuffer)) return; // the relay sends binary only
      const data = new Uint8Array(event.data);
      this.bytesReceived += data.length;
      this._queue.push(data);
      this._wake();
    });
    ws.addEventListener('close', (event) => {
      if (!this._end) {
        const clean = event.wasClean || CLEAN_CODES.has(event.code);
        this._end = { clean, error: clean ? null : new LinkError(LOST) };
      }
      this._wake();
    });
    if (signal) {
      this._onAbort = () => {
        this._end = { clean: false, error: abortError(signal) };
        this._ws.close();
        this._wake();
      };
      signal.addEventListener('abort', this._onAbort, { once: true });
    }
  }

  _forget() {
    if (this._signal && this._onAbort) this._signal.removeEventListener('abort', this._onAbort);
  }

  _wake() {
    const waiter = this._waiter;
    this._waiter = null;
    if (waiter) waiter();
  }

  /** The next bytes received; null once the relay closed cleanly; LinkError if it broke. */
  async receive() {
    for (;;) {
      if (this._end && this._end.error) throw this._end.error;
      if (this._queue.length) return this._queue.shift();
      if (this._end) return null;
      await new Promise((resolve) => { this._waiter = resolve; });
    }
  }

  /** Received bytes not yet taken by `receive`, taken now (for a non-blocking reader). */
  takeQueued() {
    const queued = this._queue;
    this._queue = [];
    return queued;
  }

  /** Queue bytes for the relay; resolves once they are handed to the socket and the
   * socket's own queue is under HIGH_WATER. Do not change `data` before it resolves. */
  async send(data) {
    if (this._end) throw this._end.error || new LinkError(LOST);
    if (!data.length) return;
    this._pending.push(data);
    if (!this._flushing) this._flushing = Promise.resolve().then(() => this._flush());
    await this._flushing;
    for (let delay = 1; this._ws.bufferedAmount > HIGH_WATER; delay = Math.min(delay * 2, 16)) {
      if (this._end) throw this._end.error || new LinkError(LOST);
      await sleep(delay);
    }
  }

  _flush() {
    this._flushing = null;
    const pieces = this._pending;
    this._pending = [];
    if (this._end || this._ws.readyState !== WebSocket.OPEN) throw (this._end && this._end.error) || new LinkError(LOST);
    let group = [];
    let size = 0;
    const emit = () => {
      if (!group.length) return;
      let message = group[0];
      if (group.length > 1) {
        message = new Uint8Array(size);
        let at = 0;
        for (const piece of group) {
          message.set(piece, at);
          at += piece.length;
        }
      }
      this._ws.send(message);
      this.bytesSent += size;
      group = [];
      size = 0;
    };
    for (let piece of pieces) {
      while (piece.length) {
        const room = MAX_MESSAGE - size;
        const part = piece.length > room ? piece.subarray(0, room) : piece;
        group.push(part);
        size += part.length;
        piece = piece.subarray(part.length);
        if (size === MAX_MESSAGE) emit();
      }
    }
    emit();
  }

  /** Close (what was sent before still goes out first). */
  close() {
    this._forget();
    if (!this._end) this._end = { clean: true, error: null };
    if (this._ws.readyState === WebSocket.CONNECTING || this._ws.readyState === WebSocket.OPEN) this._ws.close(1000);
    this._wake();
  }
}
