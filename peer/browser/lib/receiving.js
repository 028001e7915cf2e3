// The receiver's data phase on an open channel (after peer/receiving.py): greet, show the
// offer, stream each file into the saver while hashing it, check every digest
// before moving on, and acknowledge only once the saver has everything. Any failure aborts
// the saver (nothing unverified keeps a final name), tells the sender why where it can
// still listen, closes the channel, and throws one line for the user.

import { ChannelError } from './channel.js';
import { ProtocolError, isPack } from './messages.js';
import { summarize } from './offer.js';
import { Progress, ReceiverSession } from './transfer.js';
import { Blake3 } from './blake3.js';
import { prepareSaver } from './saving.js';

/** A failure for the user; `tell` says whether the sender should get it as an ERROR. */
export class TransferFailed extends Error {
  constructor(message, { tell = false } = {}) {
    super(message);
    this.name = 'TransferFailed';
    this.tell = tell;
  }
}

const equalBytes = (a, b) => a.length === b.length && a.every((value, i) => value === b[i]);

/**
 * Receive what the sender offers. `decide(summary)` shows the offer and resolves to
 * {accept: true, saver} (saver from `prepareSaver`, made in the click handler; omitted:
 * a streamed download) or {accept: false}. `onProgress({bytes, total, file, rate, eta})`
 * is called at most ~10 times a second, and once at the end. `saveMode`: 'download'
 * (default) or 'picker', used only when decide gives no saver.
 * Returns {files, bytes, savedAs, text}.
 */
export async function receiveFiles(rendezvous, { decide, onProgress = () => {}, saveMode = 'download' } = {}) {
  const { channel } = rendezvous;
  const session = new ReceiverSession({ senderPublic: rendezvous.senderPublic ?? null, publicDigest: rendezvous.publicDigest ?? null });
  let saver = null;
  let hasher = null;
  let current = null;  // the file being received
  let phase = 'before offering anything';
  const next = async () => {
    const record = await channel.receive();
    if (record === null) {
      throw new TransferFailed(current ? `the sender went away in the middle of ${current.path}` : `the sender went away ${phase}`);
    }
    return record;
  };
  try {
    if (session.bigRecords) channel.allowBigRecords();  // before the sender may use them
    await channel.send(session.hello());
    let record = await next();
    if (isPack(record)) {
      throw new TransferFailed("the sender runs bob's format, which a browser cannot receive; use peer recv");
    }
    let event = session.receive(record);
    while (event === null) event = session.receive(await next());
    if (event.type === 'peer-error') throw new TransferFailed(`the sender stopped: ${event.reason}`);
    const { offer } = event;
    const summary = summarize(offer);
    let decision;
    try {
      decision = await decide(summary);
    } catch (error) {
      await channel.send(session.decline(error.message));
      throw new TransferFailed(error.message);
    }
    if (!decision || !decision.accept) {
      await channel.send(session.decline('the receiver said no'));
      throw new TransferFailed('you declined');
    }
    saver = decision.saver ?? null;
    if (!saver && offer.entries.length) {
      try {
        saver = await prepareSaver(summary, { preferPicker: saveMode === 'picker', nameplate: rendezvous.nameplate ?? '' });
      } catch (error) {
        await channel.send(session.decline(error.message));
        throw new TransferFailed(error.message);
      }
    }
    await channel.send(session.accept());
    phase = 'before sending everything';
    const progress = new Progress(offer.sizesKnown ? offer.totalBytes : null, onProgress);
    let files = 0;
    for (;;) {
      event = session.receive(await next());
      if (event.type === 'file-data') {
        const size = event.data.length;
        hasher.update(event.data);
        await saver.write(event.data);  // it may take the bytes
        progress.advance(size);
      } else if (event.type === 'file-started') {
        current = event.entry;
        progress.file = current.path;
        await saver.openFile(current);
        hasher = new Blake3();
      } else if (event.type === 'file-finished') {
        const digest = hasher.digest();
        hasher = null;
        if (!equalBytes(digest, event.digest)) {
          const what = saver.keepsCommitted ? 'it was not saved' : 'nothing was saved';
          throw new TransferFailed(`${current.path} arrived corrupted; ${what}`, { tell: true });
        }
        await saver.commitFile(current);
        files += 1;
        current = null;
      } else if (event.type === 'transfer-done') {
        if (saver) await saver.finish();
        const saved = saver;
        saver = null;  // complete: nothing to abort from here on
        await channel.send(session.acknowledge());
        progress.end();
        await channel.close();
        return { files, bytes: event.totalBytes, savedAs: saved?.savedAs ?? null, text: offer.text };
      } else if (event.type === 'peer-error') {
        throw new TransferFailed(`the sender stopped: ${event.reason}`);
      }
    }
  } catch (error) {
    const failure = asFailure(error, current);
    if (saver) await saver.abort(failure.message).catch(() => {});
    if (failure.tell) await channel.send(session.error(failure.reason ?? failure.message)).catch(() => {});
    await channel.close().catch(() => {});
    throw failure;
  }
}

function asFailure(error, current) {
  if (error instanceof TransferFailed) return error;
  if (error instanceof ProtocolError) {
    const failure = new TransferFailed(`the sender broke the protocol: ${error.message}`, { tell: true });
    failure.reason = error.message;
    return failure;
  }
  if (error instanceof ChannelError) return new TransferFailed(error.message);
  // The saver or the disk: the sender should hear why.
  const where = current ? `cannot save ${current.path}: ` : 'cannot save: ';
  const failure = new TransferFailed(`${where}${error?.message || error}`, { tell: true });
  return failure;
}
