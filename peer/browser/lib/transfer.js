// Our data phase's two state machines (docs/transfer.md §4), sans I/O, after
// peer/transfer.py: the driver feeds each record plaintext to a session, gets an event back,
// does the I/O, and asks the session for the next outgoing messages. Bad input raises
// ProtocolError (and the session stays failed); a call in the wrong state raises Error,
// a bug in the driver. The browser speaks neither zstd nor resume, so never offers them.

import {
  MAX_BIG_DATA_SIZE, MAX_DATA_SIZE, MAX_PIECE_SIZE, PROTOCOL_VERSION, ProtocolError, TYPE,
  decodeMessage, encodeAccept, encodeAck, encodeDecline, encodeDone, encodeError, encodeFileEnd,
  encodeFileStart, encodeHello, encodeOfferPiece, messageName, publicDigest,
} from './messages.js';
import { FEATURES, MAX_OFFER_BYTES, neededFeatures, offerDocument, parseOffer } from './offer.js';

/** The sender saw a HELLO about another public than the one it sent: the relay rewrote it. */
export class HandshakeAltered extends ProtocolError {
  constructor(message) { super(message); this.name = 'HandshakeAltered'; }
}

// The rendezvous may hand the public's digest over as hex (spoke.js's publicDigest) or bytes.
const digestBytes = (value) => (typeof value === 'string'
  ? Uint8Array.from(value.match(/../g) ?? [], (pair) => parseInt(pair, 16))
  : value);

const equalBytes = (a, b) => a.length === b.length && a.every((value, i) => value === b[i]);

class Session {
  constructor(states) {
    this.state = states;
    this.failure = null;
  }

  expect(...states) {
    if (!states.includes(this.state)) throw new Error(`not allowed while the ${this.role} session is ${this.state}`);
  }

  fail(reason, Kind = ProtocolError) {
    this.state = 'failed';
    this.failure = new Kind(reason);
    return this.failure;
  }

  get finished() { return ['finished', 'declined', 'failed'].includes(this.state); }

  /** ERROR telling the peer why we stop; the session is over. */
  error(reason) {
    this.state = 'failed';
    return encodeError(reason);
  }
}

/**
 * The sender's half. Events from `receive`: {type: 'hello', version, capabilities},
 * {type: 'accepted'}, {type: 'declined', reason}, {type: 'completed', fileCount, totalBytes},
 * {type: 'peer-error', reason}.
 *
 *   receive(hello); send each of offerMessages(); receive(answer)
 *   while ((entry = nextFile())): send(beginFile(entry));
 *       while (fileRemaining) send(dataMessage(bytes up to dataRoom()));  send(endFile(digest))
 *   send(done()); receive(ack)
 */
export class SenderSession extends Session {
  /** `publicBytes`: the spoke public we announced (or `publicDigest`, its 14-byte digest);
   * a HELLO that saw another one is refused. */
  constructor(offer, { features = [FEATURES.BIG_RECORDS], publicBytes = null, publicDigest: digest = null } = {}) {
    super('waiting for the receiver\'s hello');
    this.role = 'sender';
    this.offer = offer;
    this.supported = new Set(features);
    this.ownDigest = publicBytes ? publicDigest(publicBytes) : (digest ? digestBytes(digest) : null);
    this.features = new Set();
    this.version = PROTOCOL_VERSION;
    this.fileIndices = offer.entries.flatMap((entry, i) => (entry.kind === 'file' ? [i] : []));
    this.position = 0;
    this.current = null;
    this.remaining = 0;
    this.maxData = MAX_DATA_SIZE;
  }

  receive(plaintext) {
    if (this.failure) throw this.failure;
    if (this.finished) throw this.fail('the receiver sent a message after the transfer ended');
    let message;
    try {
      message = decodeMessage(plaintext);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      if (this.state === 'waiting for the receiver\'s hello') throw this.fail(`the receiver is not a peer-relay peer (${error.message})`);
      throw this.fail(error.message);
    }
    if (message.type === TYPE.ERROR) {
      this.state = 'failed';
      return { type: 'peer-error', reason: message.reason };
    }
    if (this.state === 'waiting for the receiver\'s hello' && message.type === TYPE.HELLO) return this.onHello(message);
    if (this.state === 'waiting for the receiver\'s answer' && message.type === TYPE.ANSWER) return this.onAnswer(message);
    if (this.state === 'waiting for the receiver\'s acknowledgement' && message.type === TYPE.ACK) return this.onAck(message);
    throw this.fail(`the receiver sent ${messageName(message.type)} while the sender was ${this.state}`);
  }

  onHello(hello) {
    if (hello.version < 1) throw this.fail(`the receiver speaks version ${hello.version}, this sender needs 1`);
    if (hello.publicDigest && this.ownDigest && !equalBytes(hello.publicDigest, this.ownDigest)) {
      throw this.fail('the relay altered the handshake: the receiver was announced other sender parameters '
        + 'than we sent (cipher ids rewritten on the way)', HandshakeAltered);
    }
    this.version = Math.min(hello.version, PROTOCOL_VERSION);
    this.features = new Set(hello.capabilities.filter((name) => this.supported.has(name)));
    if (this.features.has(FEATURES.BIG_RECORDS)) this.maxData = MAX_BIG_DATA_SIZE;
    this.state = 'about to send the offer';
    return { type: 'hello', version: hello.version, capabilities: hello.capabilities };
  }

  onAnswer(answer) {
    if (!answer.accepted) {
      this.state = 'declined';
      return { type: 'declined', reason: answer.reason };
    }
    if (answer.resumePoints.length) throw this.fail('the receiver asked to resume files, which was not negotiated');
    this.state = 'between files';
    return { type: 'accepted' };
  }

  onAck(ack) {
    if (ack.fileCount !== this.offer.fileCount || ack.totalBytes !== this.offer.totalBytes) {
      throw this.fail(`the receiver confirmed ${ack.fileCount} files and ${ack.totalBytes} bytes, `
        + `but ${this.offer.fileCount} files and ${this.offer.totalBytes} bytes were sent`);
    }
    this.state = 'finished';
    return { type: 'completed', fileCount: ack.fileCount, totalBytes: ack.totalBytes };
  }

  /** Whether DATA may be big: the channel must then allow big records. */
  get bigRecords() { return this.features.has(FEATURES.BIG_RECORDS); }

  get succeeded() { return this.state === 'finished'; }

  /** What the offer needs that the receiver did not advertise (after its HELLO). */
  get missingFeatures() { return neededFeatures(this.offer).filter((name) => !this.features.has(name)); }

  /** The OFFER pieces, after the HELLO. */
  offerMessages() {
    this.expect('about to send the offer');
    if (this.missingFeatures.length) throw new Error(`the receiver lacks ${this.missingFeatures.join(', ')}`);
    const document = offerDocument(this.offer, { version: this.version, features: this.features });
    if (document.length > MAX_OFFER_BYTES) throw new Error('the offer is over the 64 MiB limit; send fewer files at once');
    const pieces = [];
    for (let at = 0; at < document.length; at += MAX_PIECE_SIZE) {
      pieces.push(encodeOfferPiece(at + MAX_PIECE_SIZE < document.length, document.subarray(at, at + MAX_PIECE_SIZE)));
    }
    this.state = 'waiting for the receiver\'s answer';
    return pieces;
  }

  /** The next file entry to send, with its index: {index, entry}; null when all are sent. */
  nextFile() {
    this.expect('between files');
    if (this.position === this.fileIndices.length) return null;
    const index = this.fileIndices[this.position];
    return { index, entry: this.offer.entries[index] };
  }

  /** FILE for the next file. */
  beginFile() {
    const next = this.nextFile();
    if (!next) throw new Error('no file is left to send');
    this.current = next.entry;
    this.remaining = next.entry.size;
    this.state = 'inside a file';
    return encodeFileStart(next.index, 0);
  }

  /** Bytes of the current file still to send. */
  get fileRemaining() { return this.state === 'inside a file' ? this.remaining : 0; }

  /** The most bytes the next DATA message may carry. */
  dataRoom() {
    this.expect('inside a file');
    return Math.min(this.maxData, this.remaining);
  }

  /** DATA carrying `bytes` (1..dataRoom()): a fresh buffer, type byte first. */
  dataMessage(bytes) {
    this.expect('inside a file');
    if (!(bytes.length >= 1 && bytes.length <= this.dataRoom())) {
      throw new RangeError(`${bytes.length} bytes do not fit a data message (${this.remaining} remaining)`);
    }
    this.remaining -= bytes.length;
    const message = new Uint8Array(1 + bytes.length);
    message[0] = TYPE.DATA;
    message.set(bytes, 1);
    return message;
  }

  /** FILE_END, once every byte of the file is sent. */
  endFile(digest) {
    this.expect('inside a file');
    if (this.remaining) throw new Error(`${this.current.path}: ${this.remaining} bytes not sent yet`);
    this.current = null;
    this.position += 1;
    this.state = 'between files';
    return encodeFileEnd(digest);
  }

  /** DONE, after the last file; then wait for the ACK. */
  done() {
    if (this.nextFile() !== null) throw new Error('files are left to send');
    this.state = 'waiting for the receiver\'s acknowledgement';
    return encodeDone();
  }
}

/**
 * The receiver's half. Events from `receive`: null (more offer pieces), {type: 'offer',
 * offer}, {type: 'file-started', entry, index}, {type: 'file-data', entry, data},
 * {type: 'file-finished', entry, digest}, {type: 'transfer-done', fileCount, totalBytes},
 * {type: 'peer-error', reason}.
 *
 *   send(hello()); receive(...) until 'offer'; send(accept()) or send(decline(reason))
 *   receive(...) per file until 'transfer-done'; send(acknowledge()) once all is saved.
 */
export class ReceiverSession extends Session {
  /** `senderPublic` (the spoke public we were announced) or its 14-byte `publicDigest`. */
  constructor({ features = [FEATURES.BIG_RECORDS, FEATURES.TEXT, FEATURES.UNKNOWN_SIZE], senderPublic = null, publicDigest: digest = null } = {}) {
    super('not started');
    this.role = 'receiver';
    this.supported = new Set(features);
    for (const name of [FEATURES.ZSTD, FEATURES.RESUME, FEATURES.PACK_ACK]) {
      if (this.supported.has(name)) throw new Error(`the browser cannot offer ${name}`);
    }
    this.publicDigest = senderPublic ? publicDigest(senderPublic) : (digest ? digestBytes(digest) : null);
    this.big = this.supported.has(FEATURES.BIG_RECORDS);
    this.features = new Set();
    this.offer = null;
    this.offerBuffer = [];
    this.offerBytes = 0;
    this.fileIndices = [];
    this.position = 0;
    this.current = null;
    this.remaining = 0;
    this.unsizedBytes = 0;
  }

  /** Whether we offer big records: the channel must accept them before HELLO goes. */
  get bigRecords() { return this.big; }

  hello() {
    this.expect('not started');
    this.state = 'waiting for the offer';
    return encodeHello({ version: PROTOCOL_VERSION, capabilities: [...this.supported].sort(), publicDigest: this.publicDigest });
  }

  receive(plaintext) {
    if (this.failure) throw this.failure;
    if (this.state === 'not started') throw new Error('send hello() before receiving');
    if (this.finished) throw this.fail('the sender sent a message after the transfer ended');
    let message;
    try {
      message = decodeMessage(plaintext, { big: this.big });
    } catch (error) {
      if (error instanceof ProtocolError) throw this.fail(error.message);
      throw error;
    }
    if (message.type === TYPE.ERROR) {
      this.state = 'failed';
      return { type: 'peer-error', reason: message.reason };
    }
    const { state } = this;
    if (state === 'waiting for the offer' && message.type === TYPE.OFFER) return this.onOfferPiece(message);
    if (state === 'between files' && message.type === TYPE.FILE) return this.onFileStart(message);
    if (state === 'between files' && message.type === TYPE.DONE) return this.onDone();
    if (state === 'inside a file' && message.type === TYPE.DATA) return this.onData(message);
    if (state === 'inside a file' && message.type === TYPE.FILE_END) return this.onFileEnd(message);
    throw this.fail(`the sender sent ${messageName(message.type)} while the receiver was ${state}`);
  }

  onOfferPiece(piece) {
    if (this.offerBytes + piece.chunk.length > MAX_OFFER_BYTES) throw this.fail('the offer is larger than 64.0 MiB');
    this.offerBuffer.push(piece.chunk.slice());
    this.offerBytes += piece.chunk.length;
    if (piece.more) return null;
    const document = new Uint8Array(this.offerBytes);
    let at = 0;
    for (const chunk of this.offerBuffer) {
      document.set(chunk, at);
      at += chunk.length;
    }
    this.offerBuffer = [];
    let parsed;
    try {
      parsed = parseOffer(document);
    } catch (error) {
      if (error instanceof ProtocolError) throw this.fail(error.message);
      throw error;
    }
    const { offer, version, features } = parsed;
    if (version !== PROTOCOL_VERSION) throw this.fail(`the sender uses version ${version}, this receiver speaks ${PROTOCOL_VERSION}`);
    const unknown = [...new Set(features)].filter((name) => !this.supported.has(name)).sort();
    if (unknown.length) throw this.fail(`the sender uses features this receiver did not offer: ${unknown.join(', ')}`);
    const missing = neededFeatures(offer).filter((name) => !features.includes(name)).sort();
    if (missing.length) throw this.fail(`the offer needs features the sender did not choose: ${missing.join(', ')}`);
    this.offer = offer;
    this.features = new Set(features);
    this.fileIndices = offer.entries.flatMap((entry, i) => (entry.kind === 'file' ? [i] : []));
    this.state = 'deciding on the offer';
    return { type: 'offer', offer };
  }

  onFileStart(start) {
    if (this.position === this.fileIndices.length) throw this.fail('the sender started a file after the last offered one');
    const expected = this.fileIndices[this.position];
    if (start.index !== expected) throw this.fail(`the sender started entry ${start.index}, expected entry ${expected}`);
    if (start.offset !== 0) throw this.fail('the sender resumed a file, which was not asked for');
    this.current = this.offer.entries[expected];
    this.remaining = this.current.size;  // null: unknown until FILE_END
    this.state = 'inside a file';
    return { type: 'file-started', entry: this.current, index: expected };
  }

  onData(message) {
    const size = message.data.length;
    if (this.remaining === null) this.unsizedBytes += size;
    else if (size > this.remaining) throw this.fail(`${this.current.path}: the sender sent more bytes than offered`);
    else this.remaining -= size;
    return { type: 'file-data', entry: this.current, data: message.data };
  }

  onFileEnd(end) {
    const entry = this.current;
    if (this.remaining) {
      throw this.fail(`${entry.path}: the sender ended the file after ${entry.size - this.remaining} of ${entry.size} bytes`);
    }
    this.current = null;
    this.position += 1;
    this.state = 'between files';
    return { type: 'file-finished', entry, digest: end.digest.slice() };
  }

  onDone() {
    if (this.position !== this.fileIndices.length) {
      throw this.fail(`the sender finished after ${this.position} of ${this.fileIndices.length} files`);
    }
    this.state = 'about to acknowledge';
    return { type: 'transfer-done', fileCount: this.offer.fileCount, totalBytes: this.offer.totalBytes + this.unsizedBytes };
  }

  /** ANSWER accepting the offer. */
  accept() {
    this.expect('deciding on the offer');
    this.state = 'between files';
    return encodeAccept();
  }

  /** ANSWER declining; the session is over. */
  decline(reason = '') {
    this.expect('deciding on the offer');
    this.state = 'declined';
    return encodeDecline(reason);
  }

  /** ACK: only once every file is verified and saved. */
  acknowledge() {
    this.expect('about to acknowledge');
    this.state = 'finished';
    return encodeAck(this.offer.fileCount, this.offer.totalBytes + this.unsizedBytes);
  }
}

/**
 * Progress for the page: `advance(n)` as bytes move; `report({bytes, total, file, rate,
 * eta})` runs at most every `interval` ms, and once more at `end()`. Rate in bytes/s over
 * the last few seconds; eta in seconds, null when the total is unknown.
 */
export class Progress {
  constructor(total, report, { interval = 100, now = () => performance.now() } = {}) {
    this.total = total;
    this.report = report;
    this.interval = interval;
    this.now = now;
    this.bytes = 0;
    this.file = null;
    this.started = now();
    this.last = -Infinity;
    this.samples = [[this.started, 0]];
  }

  advance(count) {
    this.bytes += count;
    const time = this.now();
    if (time - this.last >= this.interval) this.emit(time);
  }

  end() { this.emit(this.now()); }

  emit(time) {
    this.last = time;
    this.samples.push([time, this.bytes]);
    while (this.samples.length > 2 && time - this.samples[1][0] > 3000) this.samples.shift();
    const [since, from] = this.samples[0];
    const rate = time > since ? ((this.bytes - from) * 1000) / (time - since) : 0;
    const left = this.total === null ? null : Math.max(0, this.total - this.bytes);
    const eta = left === null || !rate ? null : left / rate;
    try {
      this.report({ bytes: this.bytes, total: this.total, file: this.file, rate, eta });
    } catch (error) {
      // the page's drawing must not break the transfer
    }
  }
}
