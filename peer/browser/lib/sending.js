// The sender's data phase on an open channel (after peer/sending.py): wait for the
// receiver's HELLO, offer, stream each file once in slices (hashed by a worker as it goes),
// and finish only on the receiver's matching ACK. The channel is read all along, so a
// receiver's ERROR ("disk full") stops the sender at once.

import { ChannelError } from './channel.js';
import { ProtocolError } from './messages.js';
import { buildOffer, summarize } from './offer.js';
import { HandshakeAltered, Progress, SenderSession } from './transfer.js';
import { Blake3 } from './blake3.js';
import { TransferFailed } from './receiving.js';

const HELLO_WAIT = 5000;  // bob's receiver says nothing at all; ours greets at once
const SLICE = 1024 * 1024;

/**
 * A selection from an <input type=file multiple> FileList (webkitRelativePath gives the
 * folders), an array of Files, or an array of {path, file} (no file: an empty directory).
 * Returns {offer, files, summary}; throws Error with one line for a name a receiver refuses.
 */
export function selectionFrom(files) {
  const items = Array.from(files, (item) => (item instanceof File
    ? { path: item.webkitRelativePath || item.name, file: item }
    : item));
  if (!items.length) throw new Error('nothing to send');
  const { offer, files: byEntry } = buildOffer(items);
  return { offer, files: byEntry, summary: summarize(offer) };
}

/**
 * The selection a drop carries, folders walked (empty ones included). Call it in the drop
 * handler itself: the browser lets go of the dropped items once the handler returns, so
 * they are taken before anything is awaited.
 */
export async function selectionFromDrop(dataTransfer) {
  const entries = Array.from(dataTransfer.items ?? [], (item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return selectionFrom(dataTransfer.files);
  const items = [];
  const walk = async (entry, path) => {
    if (entry.isFile) {
      items.push({ path, file: await new Promise((resolve, reject) => entry.file(resolve, reject)) });
      return;
    }
    const reader = entry.createReader();
    const children = [];
    for (;;) {  // readEntries hands out a directory in batches until an empty one
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      children.push(...batch);
    }
    if (!children.length) items.push({ path });
    for (const child of children) await walk(child, `${path}/${child.name}`);
  };
  try {
    for (const entry of entries) await walk(entry, entry.name);
  } catch (error) {
    throw new Error(`cannot read what was dropped: ${error?.message || error}`);
  }
  return selectionFrom(items);
}

/**
 * Send `selection` (from selectionFrom; a FileList or array is converted). `onStatus(text)`
 * tells the stage; `onProgress({bytes, total, file, rate, eta})` at most ~10 times a second.
 * Resolves to {files, bytes} only after the receiver's ACK matched; else throws one line.
 */
export async function sendFiles(rendezvous, selection, { onProgress = () => {}, onStatus = () => {} } = {}) {
  const { channel } = rendezvous;
  const chosen = selection?.offer ? selection : selectionFrom(selection);
  const { offer, files } = chosen;
  const session = new SenderSession(offer, {
    publicBytes: rendezvous.senderPublic ?? null, publicDigest: rendezvous.publicDigest ?? null,
  });
  let current = null;
  let watching = null;  // the receiver's next message, read while files go out
  let stopped = null;   // what it said, if it spoke before the end
  const next = async (when) => {
    const record = await channel.receive();
    if (record === null) throw new TransferFailed(`the receiver went away ${when}`);
    return record;
  };
  const heard = (event) => {
    if (event.type === 'peer-error') throw new TransferFailed(`the receiver stopped: ${event.reason}`);
    return event;
  };
  try {
    onStatus('waiting for the receiver');
    let timer;
    const first = await Promise.race([
      next('before greeting us'),
      new Promise((resolve) => { timer = setTimeout(() => resolve(undefined), HELLO_WAIT); }),
    ]).finally(() => clearTimeout(timer));
    if (first === undefined) {
      throw new TransferFailed('the receiver runs bob, which a browser cannot send to; use peer send');
    }
    heard(session.receive(first));
    if (session.bigRecords) channel.allowBigRecords();
    if (session.missingFeatures.length) throw new TransferFailed('the receiver cannot take this', { tell: true });
    for (const message of session.offerMessages()) await channel.send(message);
    onStatus('waiting for the receiver to accept');
    const answer = heard(session.receive(await next('before answering the offer')));
    if (answer.type === 'declined') {
      const said = answer.reason && answer.reason !== 'the receiver said no' ? `: ${answer.reason}` : '';
      throw new TransferFailed(`the receiver declined${said}`);
    }
    onStatus('sending');
    watching = next('before confirming the transfer').then((record) => heard(session.receive(record)));
    watching.then((event) => { stopped = stopped ?? { event }; }, (error) => { stopped = stopped ?? { error }; });
    const check = () => {
      if (stopped?.error) throw stopped.error;
      if (stopped) throw new ProtocolError(`the receiver sent a message while the sender was ${session.state}`);
    };
    const progress = new Progress(offer.totalBytes, onProgress);
    let sent = 0;
    for (let item = session.nextFile(); item; item = session.nextFile()) {
      current = item.entry;
      progress.file = current.path;
      const file = files[item.index];
      await channel.send(session.beginFile());
      const hasher = new Blake3();
      await sendFile(channel, session, file, current, hasher, progress, check);
      await channel.send(session.endFile(hasher.digest()));
      sent += 1;
      current = null;
    }
    await channel.send(session.done());
    onStatus('waiting for the receiver to confirm');
    const completed = await watching;
    progress.end();
    if (completed.type !== 'completed') throw new ProtocolError('the receiver did not acknowledge');
    await channel.close();
    onStatus('done');
    return { files: sent, bytes: completed.totalBytes };
  } catch (error) {
    const failure = asFailure(error);
    if (failure.tell) await channel.send(session.error(failure.reason ?? failure.message)).catch(() => {});
    await channel.close().catch(() => {});
    throw failure;
  }
}

/** Reads `file` in slices (one read ahead) and sends it as DATA messages. */
async function sendFile(channel, session, file, entry, hasher, progress, check) {
  const size = entry.size;
  const read = (at) => file.slice(at, Math.min(at + SLICE, size)).arrayBuffer();
  const changed = () => new TransferFailed(`${entry.path} changed after it was picked`, { tell: true });
  if (file.size !== size) throw changed();
  let pending = size > 0 ? read(0) : null;
  for (let at = 0; at < size;) {
    let slice;
    try {
      slice = new Uint8Array(await pending);
    } catch (error) {
      // Chromium refuses to read a picked file that changed on disk since.
      throw error?.name === 'NotReadableError' ? changed() : new TransferFailed(`cannot read ${entry.path}: ${error?.message || error}`, { tell: true });
    }
    if (slice.length !== Math.min(SLICE, size - at)) throw changed();
    at += slice.length;
    pending = at < size ? read(at) : null;
    for (let i = 0; i < slice.length;) {
      check();
      const count = Math.min(session.dataRoom(), slice.length - i);
      await channel.send(session.dataMessage(slice.subarray(i, i + count)));
      i += count;
      progress.advance(count);
    }
    hasher.update(slice);
  }
}

function asFailure(error) {
  if (error instanceof TransferFailed) return error;
  if (error instanceof HandshakeAltered) {
    const failure = new TransferFailed(error.message, { tell: true });
    return failure;
  }
  if (error instanceof ProtocolError) {
    const failure = new TransferFailed(`the receiver broke the protocol: ${error.message}`, { tell: true });
    failure.reason = error.message;
    return failure;
  }
  if (error instanceof ChannelError) return new TransferFailed(error.message);
  return new TransferFailed(String(error?.message || error), { tell: true });
}
