// The handshake of both roles as sans-I/O state machines, mirroring peer/handshake/: frames
// in (parsed by wire.PacketReader), events out. An event is a plain object with a `kind`:
//
//   send        { uid, packet }          write wire.encode(uid, packet) to the relay
//   registered  { identity }             the relay took our Hello (02 / 03); identity: bytes
//   bobSender   { uid, identity }        receiver: a sender that runs bob, which a browser
//                                        cannot receive from; it is not answered
//   proofFailed { identity, failures, allowed }   receiver: a sender's proof did not match
//   withdrawn   { uid, identity }        receiver: the sender we accepted left before 0e
//   verified    { uid, identity }        sender: a receiver proved the code; 08 is on its way
//   attemptFailed { reason, identity, used, allowed, wrongCode }   sender: one guess spent
//   declined    { uid, identity }        sender: a receiver refused us after agreeing
//   paired      { partnerUid, partnerIdentity, keys, public }      terminal: go to the room
//   failed      { reason, why }          terminal; reason is one line for the user, why one
//                                        of 'wrong_code', 'guessing_limit', 'sender_limit',
//                                        'relay_closed'
//
// No clock: the browser's receiver needs no timer (it answers through our relay only, which
// knows the scoped Hello, and reports a wrong code at once when no other sender is in play).
// Relay packets count only with header UID 0000, so a peer cannot forge the relay's goodbye.

import * as spoke from './spoke.js';
import * as wire from './wire.js';
import { nameplateOf } from './codes.js';

const { T, RELAY_UID } = wire;

export const MAX_ATTEMPTS = 3;
export const SENDERS_PER_ATTEMPT = 10;
export const RELAY_CLOSED = 'the relay closed the connection';
export const WRONG_CODE = "wrong code: the sender's proof did not match (check the code, or ask for a new one)";
export const BOB_SENDER = 'that sender runs bob, which a browser cannot receive from; use peer recv';

const send = (uid, packet) => ({ kind: 'send', uid, packet });

class Machine {
  constructor() {
    this.started = false;
    this.finished = false;
    this.identity = null;
  }

  _start(hello) {
    if (this.started) throw new Error('start() was already called');
    this.started = true;
    return [send(RELAY_UID, hello)];
  }

  _finish(event) {
    this.finished = true;
    return [event];
  }

  /** The driver lost the relay connection; `reason` is for the user if this ends it all. */
  connectionLost(reason = RELAY_CLOSED) {
    if (this.finished) return [];
    return this._finish({ kind: 'failed', reason, why: 'relay_closed' });
  }

  /** Failed for 0f or 09 0000 from the relay; null for anything else. */
  _relayGoodbye(frame) {
    if (frame.uid !== RELAY_UID) return null;
    if (frame.packet.type === T.TIMEOUT) {
      return this._finish({ kind: 'failed', reason: `${RELAY_CLOSED} (handshake timeout)`, why: 'relay_closed' });
    }
    if (frame.packet.type === T.CLOSED && frame.packet.peerUid === RELAY_UID) {
      return this._finish({ kind: 'failed', reason: RELAY_CLOSED, why: 'relay_closed' });
    }
    return null;
  }
}

const AWAITING_Y = 'awaiting Y'; // 07 sent
const AWAITING_AGREEMENT = 'awaiting agreement'; // 05 sent
const ACCEPTED = 'accepted'; // 0a sent, waiting for the relay's 0e

/**
 * The receiving peer (spoke's client). It answers every announced sender of its nameplate
 * (our relay announces only those after the scoped Hello; the salt is checked again anyway),
 * accepts the first that proves the code and refuses later ones. It stops after
 * `maxAttempts` senders failed to prove the code (each was one guess of it), or after
 * answering SENDERS_PER_ATTEMPT times that many senders in all. Publics that ask for more
 * stretching than ours wait until no handshake is in flight, cheapest first, so look-alike
 * senders cannot hold the honest one up. `makeScalar` is for test vectors.
 */
export class ReceiverHandshake extends Machine {
  constructor(password, { maxAttempts = MAX_ATTEMPTS, makeScalar = null } = {}) {
    super();
    this.password = password;
    this.nameplate = nameplateOf(password);
    this.maxAttempts = maxAttempts;
    this.maxSenders = SENDERS_PER_ATTEMPT * maxAttempts;
    this.failedProofs = 0;
    this.sendersAnswered = 0;
    this._makeScalar = makeScalar;
    this._senders = new Map();
    this._costly = new Map();
    this._accepted = null;
    this._codeRejected = false;
    this._codeConfirmed = false;
  }

  /** Hello: scoped (10) with the code's nameplate, else plain (01). */
  start() {
    return this._start(this.nameplate === null ? wire.helloClient() : wire.helloScopedClient(this.nameplate));
  }

  receive(frame) {
    if (this.finished) return [];
    const goodbye = this._relayGoodbye(frame);
    if (goodbye) return goodbye;
    const events = this._dispatch(frame);
    if (!this.finished) events.push(...this._answerCostly());
    return events;
  }

  _dispatch({ uid, packet }) {
    if (uid === RELAY_UID) {
      switch (packet.type) {
        case T.CLIENT_IDENTITY:
          this.identity = packet.identity;
          return [{ kind: 'registered', identity: packet.identity }];
        case T.NEW_SERVER: return this._onNewServer(packet);
        case T.DONE: return this._onDone();
        case T.CLOSED: return this._forget(packet.peerUid);
        default: return [];
      }
    }
    switch (packet.type) {
      case T.Y_AND_SERVER_VALIDATOR: return this._onY(uid, packet);
      case T.AGREEMENT: return this._onAgreement(uid);
      // Code 2 (our proof was refused) can only follow theirs being accepted: no evidence of
      // a wrong code, just forget that sender.
      case T.SPOKE_FAILURE: return this._forget(uid);
      default: return [];
    }
  }

  _stoppedAnswering() {
    return this.failedProofs >= this.maxAttempts || this.sendersAnswered >= this.maxSenders;
  }

  _onNewServer(packet) {
    const uid = packet.serverUid;
    // Before 03 we cannot put our identity in 07; after accepting, new senders are moot.
    if (this.identity === null || this._accepted !== null) return [];
    if (uid === RELAY_UID || this._senders.has(uid) || this._costly.has(uid)) return [];
    if (this._stoppedAnswering()) return [];
    // Someone else's transfer: do not spend their guesses or our CPU.
    if (this.nameplate !== null && !spoke.saltMatches(packet.public, this.nameplate)) return [];
    let pub;
    try {
      pub = spoke.decodePublic(packet.public);
    } catch (error) {
      if (!(error instanceof spoke.SpokeError)) throw error;
      return [send(uid, wire.spokeFailure(error.code))];
    }
    if (spoke.isBobPublic(pub)) return [{ kind: 'bobSender', uid, identity: packet.identity }];
    if (pub.iterations > spoke.DEFAULT_ITERATIONS) {
      this._costly.set(uid, { packet, pub });
      return [];
    }
    return this._answer(packet, pub);
  }

  _answerCostly() {
    if (!this._costly.size || this._accepted !== null || this._stoppedAnswering()) return [];
    for (const slot of this._senders.values()) {
      if (slot.stage === AWAITING_Y || slot.stage === AWAITING_AGREEMENT) return [];
    }
    let cheapest = null;
    for (const [uid, entry] of this._costly) {
      if (cheapest === null || entry.pub.iterations < this._costly.get(cheapest).pub.iterations) cheapest = uid;
    }
    const { packet, pub } = this._costly.get(cheapest);
    this._costly.delete(cheapest);
    return this._answer(packet, pub);
  }

  _answer(packet, pub) {
    const uid = packet.serverUid;
    const scalar = this._makeScalar ? this._makeScalar() : undefined;
    const { state, x } = spoke.clientHello(this.password, pub, { scalar });
    this._senders.set(uid, { identity: packet.identity, public: pub, state, stage: AWAITING_Y, keys: null });
    this.sendersAnswered += 1;
    if (this._stoppedAnswering()) this._costly.clear();
    return [send(uid, wire.xAndClientIdentity(x, this.identity))];
  }

  _onY(uid, packet) {
    const slot = this._senders.get(uid);
    if (!slot || slot.stage !== AWAITING_Y) return [send(RELAY_UID, wire.relayFailure('S', uid))];
    let outcome;
    try {
      outcome = spoke.clientCompute(slot.state, packet.y, packet.validator, {
        clientIdentity: this.identity, serverIdentity: slot.identity,
      });
    } catch (error) {
      if (!(error instanceof spoke.SpokeError)) throw error;
      const events = [send(uid, wire.spokeFailure(error.code))];
      if (error.code === spoke.FAILURE_BAD_CLIENT_VALIDATOR) {
        this._codeRejected = true;
        events.push(...this._proofFailed(slot));
      }
      return events.concat(this._forget(uid));
    }
    slot.state = null;
    slot.keys = outcome.keys;
    slot.stage = AWAITING_AGREEMENT;
    this._codeConfirmed = true;
    return [send(uid, wire.clientValidator(outcome.validator))];
  }

  _proofFailed(slot) {
    this.failedProofs += 1;
    const events = [{ kind: 'proofFailed', identity: slot.identity, failures: this.failedProofs, allowed: this.maxAttempts }];
    if (this.failedProofs >= this.maxAttempts) {
      // No more guesses: handshakes short of their 06 are dropped, and a 06 still coming for
      // one of them is never checked (our answer would tell the result).
      for (const [other, s] of [...this._senders]) if (s.stage === AWAITING_Y) this._senders.delete(other);
      this._costly.clear();
    }
    return events;
  }

  _onAgreement(uid) {
    const slot = this._senders.get(uid);
    if (!slot || slot.stage !== AWAITING_AGREEMENT) return [send(RELAY_UID, wire.relayFailure('H', uid))];
    if (this._accepted !== null) {
      this._senders.delete(uid);
      return [send(uid, wire.refused())];
    }
    // The browser takes the first sender that proved the code, as `peer recv -y` does; the
    // offer is what its user accepts or declines.
    slot.stage = ACCEPTED;
    this._accepted = uid;
    this._costly.clear();
    return [send(uid, wire.accepted())];
  }

  _onDone() {
    if (this._accepted === null) return [send(RELAY_UID, wire.relayFailure('N', RELAY_UID))];
    const slot = this._senders.get(this._accepted);
    return this._finish({
      kind: 'paired', partnerUid: this._accepted, partnerIdentity: slot.identity, keys: slot.keys, public: slot.public,
    });
  }

  _forget(uid) {
    const slot = this._senders.get(uid);
    this._senders.delete(uid);
    this._costly.delete(uid);
    const events = [];
    if (slot && slot.stage === ACCEPTED) {
      // Gone before 0e: the relay dropped our 0a, so wait for another sender.
      this._accepted = null;
      events.push({ kind: 'withdrawn', uid, identity: slot.identity });
    }
    events.push(...this._giveUpIfSpent());
    if (this.finished) return events;
    if (this._codeRejected && !this._codeConfirmed && !this._senders.size && !this._costly.size) {
      events.push(...this._finish({ kind: 'failed', reason: WRONG_CODE, why: 'wrong_code' }));
    }
    return events;
  }

  _giveUpIfSpent() {
    if (this.finished || this._senders.size || this._costly.size || !this._stoppedAnswering()) return [];
    const plate = this.nameplate === null ? '' : ` with nameplate ${this.nameplate}`;
    if (this.failedProofs >= this.maxAttempts) {
      const count = this.failedProofs;
      const blame = count === 1 ? 'the code is wrong, or someone is guessing it' : 'someone may be guessing it';
      return this._finish({
        kind: 'failed',
        reason: `${count} sender${count === 1 ? '' : 's'}${plate} failed to prove the code: ${blame}; ask the sender for a new code`,
        why: 'guessing_limit',
      });
    }
    return this._finish({
      kind: 'failed',
      reason: `gave up after answering ${this.sendersAnswered} senders${plate} without pairing: someone may be flooding the relay with fake senders; ask the sender for a new code`,
      why: 'sender_limit',
    });
  }
}

/**
 * The sending peer (spoke's server): publish our public, answer receivers, pair on 0a. Each
 * handshake that got our 06 and did not end in agreement was one guess of the code, and
 * handshakes in flight count against the same budget; after `maxAttempts` it gives up. Like
 * `peer send` without --confirm it never asks its user. Several receivers may be in flight
 * at once, each by its UID. `salt` and `makeScalar` are for test vectors.
 */
export class SenderHandshake extends Machine {
  constructor(password, { maxAttempts = MAX_ATTEMPTS, iterations = spoke.DEFAULT_ITERATIONS, salt = null, makeScalar = null, ciphers = [0, 0] } = {}) {
    super();
    this.nameplate = nameplateOf(password);
    this.maxAttempts = maxAttempts;
    this.secret = spoke.generate(password, { salt: salt || spoke.saltFor(this.nameplate), iterations, ciphers });
    this.public = this.secret.public;
    this.attemptsUsed = 0;
    this.wrongCodes = 0;
    this.abandoned = 0;
    this._makeScalar = makeScalar;
    this._receivers = new Map();
  }

  start() {
    return this._start(wire.helloServer(this.public.bytes));
  }

  receive(frame) {
    if (this.finished) return [];
    const goodbye = this._relayGoodbye(frame);
    if (goodbye) return goodbye;
    const { uid, packet } = frame;
    if (uid === RELAY_UID) {
      if (packet.type === T.SERVER_IDENTITY) {
        this.identity = packet.identity;
        return [{ kind: 'registered', identity: packet.identity }];
      }
      if (packet.type === T.CLOSED) return this._receiverLeft(packet.peerUid);
      return [];
    }
    switch (packet.type) {
      case T.X_AND_CLIENT_IDENTITY: return this._onX(uid, packet);
      case T.CLIENT_VALIDATOR: return this._onValidator(uid, packet.validator);
      case T.ACCEPTED: return this._onAccepted(uid);
      case T.REFUSED: return this._onRefused(uid);
      case T.SPOKE_FAILURE: return this._onSpokeFailure(uid, packet.code);
      default: return [];
    }
  }

  _inFlight() {
    let count = 0;
    for (const slot of this._receivers.values()) if (!slot.keys) count += 1;
    return count;
  }

  _onX(uid, packet) {
    // Before 02 we cannot hash our identity; a repeated 07 would be a second guess on one
    // handshake; past the budget nobody is answered.
    if (this.identity === null || this._receivers.has(uid)) return [];
    if (this.attemptsUsed + this._inFlight() >= this.maxAttempts) return [];
    const scalar = this._makeScalar ? this._makeScalar() : undefined;
    let outcome;
    try {
      outcome = spoke.serverCompute(this.secret, packet.x, {
        clientIdentity: packet.identity, serverIdentity: this.identity, scalar,
      });
    } catch (error) {
      if (!(error instanceof spoke.SpokeError)) throw error;
      return [send(uid, wire.spokeFailure(error.code))]; // it learnt nothing: not an attempt
    }
    this._receivers.set(uid, { identity: packet.identity, state: outcome.state, keys: null });
    return [send(uid, wire.yAndServerValidator(outcome.y, outcome.validator))];
  }

  _onValidator(uid, validator) {
    const slot = this._receivers.get(uid);
    if (!slot || slot.keys) return [send(RELAY_UID, wire.relayFailure('C', uid))];
    try {
      slot.keys = spoke.serverFinalize(slot.state, validator);
    } catch (error) {
      if (!(error instanceof spoke.SpokeError)) throw error;
      this._receivers.delete(uid);
      return [send(uid, wire.spokeFailure(error.code))].concat(
        this._spend(slot, true, 'its proof of the code did not match ours'));
    }
    return [send(uid, wire.agreement()), { kind: 'verified', uid, identity: slot.identity }];
  }

  _onAccepted(uid) {
    const slot = this._receivers.get(uid);
    if (!slot || !slot.keys) return [send(RELAY_UID, wire.relayFailure('H', uid))];
    return this._finish({ kind: 'paired', partnerUid: uid, partnerIdentity: slot.identity, keys: slot.keys, public: this.public });
  }

  _onRefused(uid) {
    const slot = this._receivers.get(uid);
    if (!slot) return [send(RELAY_UID, wire.relayFailure('H', uid))];
    this._receivers.delete(uid);
    // Refused before proving the code: no honest receiver does that, and it saw our 06.
    if (!slot.keys) return this._spend(slot, false, 'it refused before proving the code');
    return [{ kind: 'declined', uid, identity: slot.identity }];
  }

  _onSpokeFailure(uid, code) {
    const slot = this._receivers.get(uid);
    if (!slot || slot.keys) return [];
    this._receivers.delete(uid);
    if (code === spoke.FAILURE_BAD_CLIENT_VALIDATOR) return this._spend(slot, true, 'it says our proof does not match its code');
    return this._spend(slot, false, `it broke off (spoke failure ${code})`);
  }

  _receiverLeft(uid) {
    const slot = this._receivers.get(uid);
    if (!slot || slot.keys) return [];
    this._receivers.delete(uid);
    return this._spend(slot, false, 'it left without proving the code');
  }

  _spend(slot, wrongCode, reason) {
    this.attemptsUsed += 1;
    if (wrongCode) this.wrongCodes += 1;
    else this.abandoned += 1;
    const events = [{
      kind: 'attemptFailed', reason, identity: slot.identity, used: this.attemptsUsed, allowed: this.maxAttempts, wrongCode,
    }];
    if (this.attemptsUsed >= this.maxAttempts) {
      events.push(...this._finish({ kind: 'failed', reason: this._givingUp(), why: 'guessing_limit' }));
    }
    return events;
  }

  _givingUp() {
    const kinds = [];
    if (this.wrongCodes) kinds.push(`${this.wrongCodes} wrong code${this.wrongCodes === 1 ? '' : 's'}`);
    if (this.abandoned) kinds.push(`${this.abandoned} abandoned after seeing our proof`);
    const blame = this.abandoned
      ? 'someone else on the relay may be guessing the code'
      : 'the receiver mistyped the code, or someone else on the relay is guessing it';
    const n = this.attemptsUsed;
    return `the code was tried ${n} time${n === 1 ? '' : 's'} without success (${kinds.join(', ')}): ${blame}; send again to get a new code`;
  }
}
