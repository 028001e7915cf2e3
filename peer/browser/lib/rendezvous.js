// The drivers around the handshake machines and the secure room, as peer/meeting.py and
// peer/rendezvous.py do it over WebSocket: the handshake at `handshake?nameplate=N`, then
// the room at `room?nameplate=N` (no query without a nameplate), both resolved against the
// page's URL, so a page served under a prefix reaches its own relay.
//
// onStatus(text, stage) gets one-line updates; stage is one of 'connecting', 'registered'
// (the relay took our Hello: a sender's code may be shown from now on), 'handshake',
// 'room', 'connected'. A failure rejects with RendezvousError (its message one line for the
// user, `why` a short tag); cancelling through `signal` rejects with the signal's reason.

import { concat, fromUtf8 } from './bytes.js';
import { Channel } from './channel.js';
import { loadWords, nameplateOf, passwordBytes } from './codes.js';
import { BOB_SENDER, ReceiverHandshake, RELAY_CLOSED, SenderHandshake } from './handshake.js';
import { Link, LinkError } from './link.js';
import { publicDigest, verificationString } from './spoke.js';
import { encode, PacketReader, T, WireError } from './wire.js';

export const HELLO_PATIENCE = 10000; // ms for the relay's first answer (it answers at once)
export const ROOM_PATIENCE = 120000; // ms for the partner to reach the room (the relay gives 60 s)

const ROOM_STATUS = {
  '00': null,
  '01': 'the relay timed out waiting for our room ticket',
  '02': 'the relay does not know our room (it expired, or the other side gave up)',
};

export class RendezvousError extends Error {
  constructor(message, why = 'failed') {
    super(message);
    this.why = why;
  }
}

/** A relay endpoint's WebSocket URL: `path` resolved against `base`, ws: or wss: as the
 * page's scheme says, with the nameplate as the only query. */
export function relayUrl(base, path, nameplate = null) {
  const url = new URL(path, base);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  url.search = nameplate === null ? '' : `?nameplate=${nameplate}`;
  url.hash = '';
  return url.href;
}

function isAbort(error) {
  return error && error.name === 'AbortError';
}

async function openLink(url, signal) {
  try {
    return await Link.open(url, { signal });
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new RendezvousError(error.message, 'unreachable');
  }
}

/** The next bytes from the link, or `onTimeout()`'s error past `ms`. */
function receiveWithin(link, ms, onTimeout) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(onTimeout()), ms);
  });
  return Promise.race([link.receive(), timeout]).finally(() => clearTimeout(timer));
}

async function password(code, words, base) {
  const list = words || await loadWords(new URL('words.txt', base));
  return passwordBytes(code, list);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

async function sendQuietly(link, out) {
  try {
    if (out.length) await link.send(concat(...out));
  } catch {
    // the connection is going anyway
  }
}

/** Run a handshake machine over the relay's handshake endpoint until it pairs. */
async function meet(machine, { base, onStatus, signal, role }) {
  const url = relayUrl(base, 'handshake', machine.nameplate);
  const where = new URL(url).host;
  onStatus('connecting to the relay', 'connecting');
  const link = await openLink(url, signal);
  const reader = new PacketReader();
  let answered = false;
  try {
    let pending = machine.start();
    for (;;) {
      const out = [];
      for (const event of pending) {
        switch (event.kind) {
          case 'send':
            out.push(encode(event.uid, event.packet));
            if (event.packet.type === T.X_AND_CLIENT_IDENTITY) onStatus('checking the code with the sender', 'handshake');
            if (event.packet.type === T.Y_AND_SERVER_VALIDATOR) onStatus('checking the code with a receiver', 'handshake');
            break;
          case 'registered':
            if (role === 'receiver') {
              const plate = machine.nameplate === null ? '' : ` (nameplate ${machine.nameplate})`;
              onStatus(`waiting for the sender${plate}`, 'registered');
            } else {
              onStatus('waiting for the receiver', 'registered');
            }
            break;
          case 'bobSender':
            // Without a nameplate the code is likely a bob password, and that sender ours.
            if (machine.nameplate === null) {
              await sendQuietly(link, out);
              throw new RendezvousError(BOB_SENDER, 'bob');
            }
            onStatus(`a sender that runs bob was announced and skipped; waiting for the sender (nameplate ${machine.nameplate})`, 'registered');
            break;
          case 'proofFailed':
            onStatus(`a sender failed to prove the code (${event.failures} of ${event.allowed}); waiting for another`, 'registered');
            break;
          case 'withdrawn':
            onStatus('the sender left before the room opened; waiting for another', 'registered');
            break;
          case 'attemptFailed':
            onStatus(`a receiver failed to prove the code: ${event.reason} (${event.used} of ${plural(event.allowed, 'attempt')} used); waiting for the receiver`, 'registered');
            break;
          case 'declined':
            onStatus('a receiver declined; waiting for the receiver', 'registered');
            break;
          case 'failed':
            // What the machine said last (a Spoke_failure) tells the other side why.
            await sendQuietly(link, out);
            throw new RendezvousError(event.reason, event.why);
          case 'paired':
            if (out.length) await link.send(concat(...out));
            return event;
          default:
            break; // 'verified': 08 is on its way, nothing to show yet
        }
      }
      if (out.length) {
        try {
          await link.send(concat(...out));
        } catch (error) {
          if (isAbort(error)) throw error;
          pending = machine.connectionLost(RELAY_CLOSED);
          continue;
        }
      }
      let data;
      try {
        data = answered ? await link.receive() : await receiveWithin(link, HELLO_PATIENCE,
          () => new RendezvousError(`${where} is not a peer-relay relay (no answer to Hello within ${HELLO_PATIENCE / 1000} s)`, 'not_a_relay'));
      } catch (error) {
        if (isAbort(error) || error instanceof RendezvousError) throw error;
        data = null;
      }
      if (data === null) {
        if (!answered) throw new RendezvousError(`${where} closed the connection without answering Hello: it is not a peer-relay relay, or it is turning connections away`, 'not_a_relay');
        pending = machine.connectionLost(RELAY_CLOSED);
        continue;
      }
      let frames;
      try {
        reader.feed(data);
        frames = reader.frames();
      } catch (error) {
        if (!(error instanceof WireError)) throw error;
        if (!answered) throw new RendezvousError(`${where} is not a peer-relay relay (it answered with something else)`, 'not_a_relay');
        throw new RendezvousError(`the relay sent something invalid: ${error.message}`, 'relay_closed');
      }
      if (frames.length) answered = true;
      pending = [];
      for (const frame of frames) pending.push(...machine.receive(frame));
    }
  } finally {
    link.close();
  }
}

/** Present the partner's identity to the room and wait for the relay's `00`; what follows
 * the status already belongs to the channel. */
async function openRoom({ base, nameplate, partnerIdentity, signal }) {
  const link = await openLink(relayUrl(base, 'room', nameplate), signal);
  try {
    await link.send(concat(partnerIdentity, Uint8Array.of(0x0a)));
    let got = new Uint8Array(0);
    while (got.length < 2) {
      const data = await receiveWithin(link, ROOM_PATIENCE,
        () => new RendezvousError(`the other side did not reach the secure room within ${ROOM_PATIENCE / 1000} s`, 'room'));
      if (data === null) throw new RendezvousError('the relay closed the room before the other side arrived', 'room');
      got = concat(got, data);
    }
    const status = String.fromCharCode(got[0], got[1]);
    if (!(status in ROOM_STATUS)) {
      throw new RendezvousError(`the relay's secure room is not a peer-relay secure room (it answered our ticket with ${JSON.stringify(status)})`, 'room');
    }
    if (ROOM_STATUS[status]) throw new RendezvousError(ROOM_STATUS[status], 'room');
    return { link, initial: got.subarray(2) };
  } catch (error) {
    link.close();
    if (isAbort(error) || error instanceof RendezvousError) throw error;
    if (error instanceof LinkError) throw new RendezvousError("lost the connection to the relay's secure room", 'room');
    throw error;
  }
}

async function rendezvous(role, { base, code, onStatus = () => {}, signal, words }) {
  const secret = await password(code, words, base);
  const machine = role === 'receiver'
    ? new ReceiverHandshake(secret)
    : new SenderHandshake(secret);
  const paired = await meet(machine, { base, onStatus, signal, role });
  onStatus('opening the secure room', 'room');
  const { link, initial } = await openRoom({ base, nameplate: machine.nameplate, partnerIdentity: paired.partnerIdentity, signal });
  const { senderToReceiver, receiverToSender } = paired.keys;
  const channel = await Channel.create(link, role === 'receiver'
    ? { sendKey: receiverToSender, receiveKey: senderToReceiver, initial }
    : { sendKey: senderToReceiver, receiveKey: receiverToSender, initial });
  onStatus('connected', 'connected');
  return {
    channel,
    verification: verificationString(senderToReceiver),
    peerIdentity: fromUtf8(paired.partnerIdentity),
    senderPublic: paired.public.bytes,
    publicDigest: publicDigest(paired.public.bytes),
    nameplate: machine.nameplate,
  };
}

/** Receive: find the sender of `code` through the relay at `base` and open the room. */
export function receiveRendezvous({ base, code, onStatus, signal, words }) {
  return rendezvous('receiver', { base, code, onStatus, signal, words });
}

/** Send: wait at the relay under `code` (shown to the user once stage 'registered' came)
 * for a receiver that proves it, then open the room. */
export function sendRendezvous({ base, code, onStatus, signal, words }) {
  return rendezvous('sender', { base, code, onStatus, signal, words });
}

export { nameplateOf };
