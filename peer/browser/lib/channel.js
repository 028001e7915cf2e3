// The encrypted channel over the secure room, like peer/channel.py: records.Sealer and
// records.Opener driven over a Link. Receiving is pipelined: a pump reads the link, frames
// records and starts their decryption as they arrive (up to RECEIVE_AHEAD records ahead of
// the reader), and `receive` hands the plaintexts out in order. Sending is pipelined too:
// up to SEND_AHEAD records are being sealed or written while the caller prepares the next.

import { LOST as LINK_LOST } from './link.js';
import { CLOSE, CLOSED, MAX_RECORD_SIZE, Opener, RecordError, Sealer } from './records.js';

export const LOST = 'the connection through the relay was lost';
const RECEIVE_AHEAD = 16;
const SEND_AHEAD = 8;

export class ChannelError extends Error {}

function why(error) {
  // The link's own "lost" would only say the same thing twice.
  if (!error || !error.message || error.message === LINK_LOST) return '';
  return ` (${error.message})`;
}

export class Channel {
  /** `initial`: bytes the room already delivered after its status (they are records). */
  static async create(link, { sendKey, receiveKey, initial = null }) {
    const [sealer, opener] = await Promise.all([Sealer.create(sendKey), Opener.create(receiveKey)]);
    return new Channel(link, sealer, opener, initial);
  }

  constructor(link, sealer, opener, initial = null) {
    this.link = link;
    this._sealer = sealer;
    this._opener = opener;
    this.bytesSent = 0;
    this.bytesReceived = 0;
    /** After `receive` returned null: 'peer' (its close marker) or 'connection' (clean end). */
    this.endedBy = null;
    this._results = []; // { promise } | { end } | { error }, in record order
    this._resultWaiter = null;
    this._roomWaiter = null;
    this._tail = Promise.resolve();
    this._inflight = [];
    this._sendError = null;
    this._held = null;
    if (initial && initial.length) {
      this._opener.feed(initial);
      this.bytesReceived += initial.length;
    }
    // The pump starts with the first `receive`, so that `allowBigRecords` called before it
    // frames every record.
    this._pumping = false;
  }

  /** Both peers agreed on `big-records`: records of up to 256 KiB, both ways. */
  allowBigRecords() {
    this._sealer.big = this._opener.big = true;
  }

  get bigRecords() {
    return this._sealer.big;
  }

  /** The largest plaintext one `send` takes now. */
  get maxRecordSize() {
    return this._sealer.big ? 256 * 1024 : MAX_RECORD_SIZE;
  }

  // --- receiving ----------------------------------------------------------------------------

  _push(result) {
    this._results.push(result);
    const waiter = this._resultWaiter;
    this._resultWaiter = null;
    if (waiter) waiter();
  }

  async _pump() {
    try {
      for (;;) {
        for (;;) {
          if (this._results.length >= RECEIVE_AHEAD) {
            await new Promise((resolve) => { this._roomWaiter = resolve; });
            continue;
          }
          const item = this._opener.next();
          if (item === null) break;
          if (item === CLOSED) {
            this._push({ end: 'peer' });
            return;
          }
          const promise = this._opener.open(item);
          promise.catch(() => {}); // reported when its turn comes, not as unhandled
          this._push({ promise });
        }
        const data = await this.link.receive();
        if (data === null) {
          this._opener.eof();
          this._push({ end: 'connection' });
          return;
        }
        this.bytesReceived += data.length;
        this._opener.feed(data);
      }
    } catch (error) {
      this._push({ error: this._receiveError(error) });
    }
  }

  _receiveError(error) {
    if (error instanceof ChannelError) return error;
    if (error instanceof RecordError) {
      if (error.message.startsWith('stream ended')) return new ChannelError(`${LOST} in the middle of a record (${error.message})`);
      return new ChannelError(`the encrypted stream is corrupted: ${error.message}`);
    }
    if (error && error.name === 'AbortError') return error;
    return new ChannelError(`${LOST}${why(error)}`);
  }

  /** The next plaintext record; null once the other side closed (marker or clean end of
   * the stream at a record boundary); ChannelError on corruption or a lost connection. */
  async receive() {
    if (this._held) {
      const held = this._held;
      this._held = null;
      return held;
    }
    if (!this._pumping) {
      this._pumping = true;
      this._pump();
    }
    while (!this._results.length) await new Promise((resolve) => { this._resultWaiter = resolve; });
    const head = this._results[0];
    if (head.error) throw head.error;
    if (head.end) {
      this.endedBy = head.end;
      return null;
    }
    this._results.shift();
    const waiter = this._roomWaiter;
    this._roomWaiter = null;
    if (waiter) waiter();
    try {
      return await head.promise;
    } catch (error) {
      const failure = this._receiveError(error);
      this._results = [{ error: failure }]; // a corrupt stream stays corrupt
      throw failure;
    }
  }

  /** Give back a record taken early: the next `receive` returns it. */
  hold(record) {
    this._held = record;
  }

  // --- sending ------------------------------------------------------------------------------

  /** Seal and write one record (1..maxRecordSize bytes). It returns once the record is on
   * its way and fewer than SEND_AHEAD are pending; a failure shows at a later call. Do not
   * change `plaintext` afterwards (WebCrypto copies it at once; the caller may reuse it). */
  async send(plaintext) {
    if (this._sendError) throw this._sendError;
    const sealed = this._sealer.seal(plaintext); // throws at once for a bad size
    sealed.catch(() => {});
    const step = this._tail.then(async () => {
      if (this._sendError) return;
      try {
        const record = await sealed;
        await this.link.send(record);
        this.bytesSent += record.length;
      } catch (error) {
        this._sendError = error && error.name === 'AbortError' ? error : new ChannelError(`${LOST}${why(error)}`);
      }
    });
    this._tail = step;
    this._inflight.push(step);
    while (this._inflight.length >= SEND_AHEAD) await this._inflight.shift();
    if (this._sendError) throw this._sendError;
  }

  /** Wait until every record sent so far is written. */
  async flush() {
    await this._tail;
    this._inflight = [];
    if (this._sendError) throw this._sendError;
  }

  /** Send what is pending, then the close marker, then close the connection. */
  async close() {
    try {
      await this.flush();
      await this.link.send(CLOSE);
    } catch {
      // closing anyway
    } finally {
      this.link.close();
    }
  }

  /** Close at once, dropping what is pending. */
  abort() {
    this.link.close();
  }
}
