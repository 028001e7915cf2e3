// A WebSocket to the relay as a byte stream (docs/protocol.md §2): binary messages whose
// boundaries mean nothing. Writes made in the same turn of the event loop go out as one
// message (at most 1 MiB, the relay's limit), and `send` waits while more than HIGH_WATER
// bytes are queued in the browser, so a fast producer cannot fill memory.
//
// Two implementations behind one API. Where the browser has `WebSocketStream` (Chromium),
// we stop reading from it once READ_AHEAD bytes wait untaken, so a page that consumes
// slowly (a busy main thread, a slow disk) leaves the bytes in the network: TCP flow control then
// holds back the relay, and the relay's bounded pipe holds back the sender. The classic
// `WebSocket` (Firefox, Safari) cannot stop reading: everything the relay sends piles up
// in the page until it is taken.
//
// Why a budget and not one read ahead: Chromium 156 drops the messages it holds back when
// the connection closes while no read is pending (Blink's channel ends on the drop without
// delivering its pending frames; measured: 4 messages of 1000 bytes then Close, read one,
// wait, read again: the other 3 are gone). Reading on while under the budget keeps a read
// pending whenever the page keeps up, so it pauses only when the page is READ_AHEAD
// behind, and our protocol never closes on a receiver that far behind except on failure
// (the sender waits for the receiver's ACK). A close that comes while we pause may have
// lost bytes we cannot count, so it ends the link with LinkError(LOST), never cleanly.

export const HIGH_WATER = 4 * 1024 * 1024;
export const MAX_MESSAGE = 1024 * 1024;
/** Bytes the stream implementation reads before `receive` takes them; then it pauses. */
export const READ_AHEAD = 4 * 1024 * 1024;
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

function unreachable(url) {
  return new LinkError(`could not reach the relay at ${new URL(url).host}`);
}

/** 'stream' where the browser has WebSocketStream, else 'classic'. */
export function defaultImplementation() {
  return typeof globalThis.WebSocketStream === 'function' ? 'stream' : 'classic';
}

export class Link {
  /** Connect; rejects with LinkError if the relay cannot be reached, or the abort reason.
   * `implementation` ('stream' or 'classic') overrides the choice, for tests. */
  static open(url, { signal, implementation = defaultImplementation() } = {}) {
    if (implementation === 'stream') return StreamLink.connect(url, signal);
    if (implementation === 'classic') return ClassicLink.connect(url, signal);
    return Promise.reject(new LinkError(`no such link implementation: ${implementation}`));
  }

  constructor(signal) {
    this._signal = signal;
    this._queue = [];
    this._waiter = null;
    this._end = null; // { clean, error } once the connection ended
    this._pending = [];
    this._flushing = null;
    this._queued = 0; // bytes in _queue
    this.bytesReceived = 0;
    this.bytesSent = 0;
    if (signal) {
      this._onAbort = () => {
        this._end = { clean: false, error: abortError(signal) };
        this._abort();
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

  _received(data) {
    this.bytesReceived += data.length;
    this._queued += data.length;
    this._queue.push(data);
  }

  _closed(code, wasClean) {
    if (!this._end) {
      const clean = wasClean || CLEAN_CODES.has(code);
      this._end = { clean, error: clean ? null : new LinkError(LOST) };
    }
  }

  /** The next bytes received; null once the relay closed cleanly; LinkError if it broke. */
  async receive() {
    for (;;) {
      if (this._end && this._end.error) throw this._end.error;
      if (this._queue.length) {
        const data = this._queue.shift();
        this._queued -= data.length;
        this._readAhead();
        return data;
      }
      if (this._end) return null;
      this._readAhead();
      // Woken by data, the end, or an abort; a receive abandoned by its caller (a timeout
      // race) leaves what arrives in the queue for the next one.
      await new Promise((resolve) => { this._waiter = resolve; });
    }
  }

  /** Received bytes not yet taken by `receive`, taken now (for a non-blocking reader). */
  takeQueued() {
    const queued = this._queue;
    this._queue = [];
    this._queued = 0;
    this._readAhead();
    return queued;
  }

  /** Queue bytes for the relay; resolves once they are handed to the socket and the
   * browser's own queue is under HIGH_WATER. Do not change `data` before it resolves. */
  async send(data) {
    this._checkSendable();
    if (!data.length) return;
    this._pending.push(data);
    if (!this._flushing) this._flushing = Promise.resolve().then(() => this._flush());
    await this._flushing;
    await this._drain();
  }

  _flush() {
    this._flushing = null;
    const pieces = this._pending;
    this._pending = [];
    this._checkWritable();
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
      this._write(message, group.length > 1);
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

  _checkSendable() {
    if (this._end) throw this._end.error || new LinkError(LOST);
  }

  /** Close (what was sent before still goes out first). */
  close() {
    this._forget();
    if (!this._end) this._end = { clean: true, error: null };
    this._close();
    this._wake();
  }
}

/** The classic WebSocket: the browser reads everything as it comes. */
class ClassicLink extends Link {
  static connect(url, signal) {
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
      const link = new ClassicLink(ws, signal);
      const fail = () => {
        link._forget();
        reject(signal && signal.aborted ? abortError(signal) : unreachable(url));
      };
      ws.addEventListener('open', () => {
        ws.removeEventListener('close', fail);
        resolve(link);
      }, { once: true });
      ws.addEventListener('close', fail, { once: true });
    });
  }

  constructor(ws, signal) {
    super(signal);
    this.implementation = 'classic';
    this._ws = ws;
    ws.addEventListener('message', (event) => {
      if (!(event.data instanceof ArrayBuffer)) return; // the relay sends binary only
      this._received(new Uint8Array(event.data));
      this._wake();
    });
    ws.addEventListener('close', (event) => {
      this._closed(event.code, event.wasClean);
      this._wake();
    });
  }

  _readAhead() {} // the browser reads on its own

  _abort() {
    this._ws.close();
  }

  _checkWritable() {
    if (this._end || this._ws.readyState !== WebSocket.OPEN) throw (this._end && this._end.error) || new LinkError(LOST);
  }

  _write(message) {
    this._ws.send(message); // copies at once
  }

  async _drain() {
    for (let delay = 1; this._ws.bufferedAmount > HIGH_WATER; delay = Math.min(delay * 2, 16)) {
      this._checkSendable();
      await sleep(delay);
    }
  }

  _close() {
    if (this._ws.readyState === WebSocket.CONNECTING || this._ws.readyState === WebSocket.OPEN) this._ws.close(1000);
  }
}

/** WebSocketStream: reading only on demand gives the relay → page direction backpressure,
 * and a write's promise tells when the network took it. */
class StreamLink extends Link {
  static connect(url, signal) {
    return new Promise((resolve, reject) => {
      if (signal && signal.aborted) {
        reject(abortError(signal));
        return;
      }
      let wss;
      try {
        wss = new globalThis.WebSocketStream(url);
      } catch (error) {
        reject(new LinkError(`cannot connect to ${url}: ${error.message}`));
        return;
      }
      let settled = false;
      const onAbort = () => {
        if (settled) return;
        settled = true;
        wss.close();
        reject(abortError(signal));
      };
      if (signal) signal.addEventListener('abort', onAbort, { once: true });
      wss.closed.catch(() => {}); // its outcome is read from the stream
      wss.opened.then(({ readable, writable }) => {
        if (signal) signal.removeEventListener('abort', onAbort);
        if (settled) return;
        settled = true;
        resolve(new StreamLink(wss, readable, writable, signal));
      }, () => {
        if (signal) signal.removeEventListener('abort', onAbort);
        if (settled) return;
        settled = true;
        reject(signal && signal.aborted ? abortError(signal) : unreachable(url));
      });
    });
  }

  constructor(wss, readable, writable, signal) {
    super(signal);
    this.implementation = 'stream';
    this._wss = wss;
    this._reader = readable.getReader();
    this._writer = writable.getWriter();
    this._reading = false;
    this._unsettled = 0; // bytes given to the writer and not yet taken by the network
    this._lastWrite = Promise.resolve();
    this._writeError = null;
    this._senders = [];
    this._closing = false;
    this._cutShort = false; // closed while paused: the browser may have dropped bytes
    const check = () => {
      if (!this._reading && !this._end) this._cutShort = true;
    };
    wss.closed.then(check, check);
    this._writer.closed.catch(() => {});
    this._readAhead(); // from the start, like the classic socket (see READ_AHEAD)
  }

  _readAhead() {
    if (this._reading || this._end || this._queued >= READ_AHEAD) return;
    this._reading = true;
    this._reader.read().then(({ value, done }) => {
      this._reading = false;
      if (done) {
        this._closed(1000, true); // the readable ends only on a clean close
      } else {
        if (value instanceof ArrayBuffer) {
          this._received(new Uint8Array(value));
        } else if (ArrayBuffer.isView(value)) {
          this._received(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
        } // else a text message: the relay sends binary only
        this._readAhead(); // at once, in this task (see READ_AHEAD)
      }
      this._wake();
    }, (error) => {
      this._reading = false;
      this._closed(error && error.closeCode, false);
      this._wake();
    });
  }

  _closed(code, wasClean) {
    if (this._cutShort && !this._end) this._end = { clean: false, error: new LinkError(LOST) };
    else super._closed(code, wasClean);
  }

  _abort() {
    this._closing = true;
    this._wss.close();
    this._wakeSenders();
  }

  _checkSendable() {
    super._checkSendable();
    if (this._writeError) throw this._writeError;
  }

  _checkWritable() {
    this._checkSendable();
  }

  _write(message, fresh) {
    // The writer may hold the chunk after `send` resolved, when the caller may reuse it.
    const chunk = fresh ? message : message.slice();
    this._unsettled += chunk.length;
    const written = this._writer.write(chunk);
    this._lastWrite = written.then(() => {
      this._unsettled -= chunk.length;
      this._wakeSenders();
    }, () => {
      if (!this._writeError) this._writeError = (this._end && this._end.error) || new LinkError(LOST);
      this._wakeSenders();
    });
  }

  _wakeSenders() {
    const senders = this._senders;
    this._senders = [];
    for (const wake of senders) wake();
  }

  async _drain() {
    while (this._unsettled > HIGH_WATER) {
      this._checkSendable();
      await new Promise((resolve) => { this._senders.push(resolve); });
    }
  }

  _close() {
    if (this._closing) return;
    this._closing = true;
    // What was written goes out before the Close frame (closing at once would drop it).
    this._lastWrite.finally(() => this._wss.close({ closeCode: 1000 }));
    this._wakeSenders();
  }
}
