// Where received bytes go, with one promise: nothing appears under its final name unless it
// is complete and verified. Two ways:
// - a streamed download through the service worker (sw.js): the default, and the only way
//   in an automated browser. The download is closed only after the last file is verified
//   and errored on any failure, so the browser deletes its partial file.
// - the File System Access API (Chromium, used by a person): one file through a save
//   dialog, several into a chosen folder as the real tree. createWritable() writes to a
//   swap file that takes the name only on close(), which we call once the file is verified.
//
// A saver: openFile(entry), write(bytes) (which may take the bytes' buffer: the caller must
// not use it again), commitFile(entry) once verified, finish() after
// the last, abort(reason) on any failure; `savedAs` says where things went.

import { ZipWriter } from './zip.js';

const HIGH_WATER = 8 * 1024 * 1024;  // bytes sent toward the download, unread, before we wait
const START_TIMEOUT = 15_000;
const KEEP_ALIVE = 10_000;

const baseName = (path) => path.slice(path.lastIndexOf('/') + 1);

/** Whether the folder and save pickers may be used: a person at a Chromium, not a robot. */
export function pickerAvailable() {
  return typeof globalThis.showSaveFilePicker === 'function' && typeof globalThis.showDirectoryPicker === 'function'
    && !navigator.webdriver;
}

/** The download's name: the file's, the single top-level directory's, else the nameplate's. */
export function downloadName(summary, nameplate = '') {
  const { entries } = summary;
  if (entries.length === 1 && entries[0].kind === 'file') return entries[0].path;
  const tops = summary.topLevel;
  if (tops.length === 1 && entries[0].kind === 'dir') return `${tops[0]}.zip`;
  return `peer-relay-${nameplate || 'files'}.zip`;
}

/**
 * The saver for an accepted offer. With `preferPicker` (and a picker available) this opens a
 * dialog, so call it straight from the accept button's click handler, before any other
 * await: the browser allows dialogs only during a user's gesture. Rejects with
 * Error('you cancelled saving') when the person closes the dialog.
 */
export async function prepareSaver(summary, { preferPicker = true, nameplate = '' } = {}) {
  const single = summary.entries.length === 1 && summary.entries[0].kind === 'file';
  if (preferPicker && pickerAvailable()) {
    try {
      if (single) {
        const handle = await globalThis.showSaveFilePicker({ suggestedName: summary.entries[0].path });
        return new PickedFileSaver(handle);
      }
      const folder = await globalThis.showDirectoryPicker({ mode: 'readwrite', id: 'peer-relay' });
      return new PickedTreeSaver(folder, summary.entries);
    } catch (error) {
      if (error?.name === 'AbortError') throw new Error('you cancelled saving');
      throw new Error(`cannot save there: ${error?.message || error}`);
    }
  }
  const name = downloadName(summary, nameplate);
  const download = await startDownload(name, single ? summary.entries[0].size : null);
  return single ? new DownloadSaver(download) : new ZipSaver(download, summary.entries);
}

// --- the streamed download ------------------------------------------------------------------

// The port protocol spoken with sw.js. A browser keeps the worker of an earlier visit
// registered, and does not replace it before this page needs it, so the script's URL
// carries the version: a new URL makes register() install the new worker, which we wait
// for; and the worker says its version, so a mismatch fails at once with a reason.
export const WORKER_PROTOCOL = 2;

let registration = null;

async function activeWorker() {
  if (!('serviceWorker' in navigator)) return null;
  if (!registration) {
    const script = new URL(`../sw.js?protocol=${WORKER_PROTOCOL}`, import.meta.url);
    registration = navigator.serviceWorker.register(script, { scope: new URL('./', script).href, type: 'classic' })
      .then(async (reg) => {
        const worker = reg.installing || reg.waiting || reg.active;
        if (worker.state !== 'activated') {
          await new Promise((resolve, reject) => {
            worker.addEventListener('statechange', () => {
              if (worker.state === 'activated') resolve();
              if (worker.state === 'redundant') reject(new Error('the download helper (service worker) failed to start'));
            });
          });
        }
        return reg;
      });
    registration.catch(() => { registration = null; });
  }
  const reg = await registration;
  return reg.active;
}

/**
 * A download of `name` (`size` bytes, or null when unknown) fed by write(bytes), which takes
 * the bytes' buffer; close() completes it once the browser has read every byte,
 * abort(reason) fails it. Falls back to a Blob in memory where no service worker can run (a
 * private window in some browsers).
 */
export async function startDownload(name, size = null) {
  let worker = null;
  try {
    worker = await activeWorker();
  } catch (error) {
    worker = null;
  }
  if (!worker) return new MemoryDownload(name);
  const id = crypto.randomUUID();
  const channel = new MessageChannel();
  const download = new StreamDownload(id, name, channel.port1, worker);
  worker.postMessage({ type: 'download', id, name, size }, [channel.port2]);
  await download.until('registered', 'the download helper did not answer');
  if (download.protocol !== WORKER_PROTOCOL) {
    download.done();
    throw new Error('the download helper is out of date: reload the page');
  }
  download.frame = document.createElement('iframe');
  download.frame.hidden = true;
  download.frame.src = new URL(`../download/${id}`, import.meta.url).href;
  document.body.append(download.frame);
  await download.until('started', 'the browser did not start the download');
  return download;
}

/** Bytes to the service worker's download through a port (sw.js says how). */
class StreamDownload {
  constructor(id, name, port, worker) {
    this.name = name;
    this.port = port;
    this.seen = new Set();
    this.listeners = [];
    this.frame = null;
    this.untaken = 0;  // bytes posted that the browser has not read yet
    this.protocol = null;  // the worker's, from its 'registered'
    this.failure = null;
    port.onmessage = ({ data }) => {
      if (data?.type === 'taken') this.untaken -= data.size;
      else this.seen.add(data?.type);
      if (data?.type === 'registered') this.protocol = data.protocol;
      if (data?.type === 'cancelled') this.failure ??= new Error('the download was cancelled');
      for (const listener of this.listeners.splice(0)) listener();
    };
    // A service worker idle for a while may be stopped; messages keep it running, and tell
    // it that this page is still there.
    this.keepAlive = setInterval(() => worker.postMessage({ type: 'keep-alive', id }), KEEP_ALIVE);
  }

  /** Waits until the worker said `type` (or until `failure` after `timeout` ms, 0: never). */
  until(type, failure, timeout = START_TIMEOUT) {
    return new Promise((resolve, reject) => {
      const timer = timeout ? setTimeout(() => reject(new Error(failure)), timeout) : null;
      const check = () => {
        if (this.seen.has(type)) {
          clearTimeout(timer);
          resolve();
        } else if (this.failure) {
          clearTimeout(timer);
          reject(this.failure);
        } else {
          this.listeners.push(check);
        }
      };
      check();
    });
  }

  /** Takes `bytes`: their buffer is handed to the worker, not copied, so the caller must not
   * use it again. Waits while HIGH_WATER bytes are not yet read by the browser. */
  async write(bytes) {
    if (this.failure) throw this.failure;
    if (!bytes.length) return;
    this.untaken += bytes.length;
    this.port.postMessage({ type: 'chunk', bytes }, [bytes.buffer]);
    while (this.untaken >= HIGH_WATER) {
      await new Promise((resolve) => this.listeners.push(resolve));
      if (this.failure) throw this.failure;
    }
  }

  async close() {
    if (this.failure) throw this.failure;
    this.port.postMessage({ type: 'close' });
    try {
      await this.until('consumed', '', 0);
    } finally {
      this.done();
    }
  }

  async abort(reason) {
    if (!this.failure) this.port.postMessage({ type: 'abort', reason: reason || 'the transfer failed' });
    this.failure ??= new Error('the download was aborted');
    this.done();
  }

  done() {
    clearInterval(this.keepAlive);
    this.port.close();
    const { frame } = this;
    // The download manager owns the download by now; the frame only has to outlive it starting.
    if (frame) setTimeout(() => frame.remove(), 30_000);
  }
}

class MemoryDownload {
  constructor(name) {
    this.name = name;
    this.parts = [];
  }

  async write(bytes) { this.parts.push(bytes.slice()); }

  async close() {
    const url = URL.createObjectURL(new Blob(this.parts, { type: 'application/octet-stream' }));
    this.parts = [];
    const link = document.createElement('a');
    link.href = url;
    link.download = this.name;
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  async abort() { this.parts = []; }
}

class DownloadSaver {
  constructor(download) {
    this.download = download;
    this.savedAs = download.name;
  }

  async openFile() {}

  write(bytes) { return this.download.write(bytes); }

  async commitFile() {}

  finish() { return this.download.close(); }

  abort(reason) { return this.download.abort(reason); }
}

/** Several entries as one streamed ZIP: directories as they come, in the offer's order. */
class ZipSaver {
  constructor(download, entries) {
    this.download = download;
    this.savedAs = download.name;
    this.entries = entries;
    this.next = 0;
    this.zip = new ZipWriter((bytes) => download.write(bytes));
  }

  async directoriesUpTo(entry) {
    while (this.next < this.entries.length && this.entries[this.next] !== entry) {
      const pending = this.entries[this.next++];
      if (pending.kind === 'dir') await this.zip.directory(pending.path);
    }
    if (entry) this.next += 1;
  }

  async openFile(entry) {
    await this.directoriesUpTo(entry);
    await this.zip.beginFile(entry.path, entry.size);
  }

  write(bytes) { return this.zip.write(bytes); }

  commitFile() { return this.zip.endFile(); }

  async finish() {
    await this.directoriesUpTo(null);
    await this.zip.finish();
    await this.download.close();
  }

  abort(reason) { return this.download.abort(reason); }
}

// --- the File System Access API -----------------------------------------------------------

class PickedFileSaver {
  constructor(handle) {
    this.handle = handle;
    this.savedAs = handle.name;
    this.writable = null;
  }

  async openFile() { this.writable = await this.handle.createWritable(); }

  write(bytes) { return this.writable.write(bytes); }

  async commitFile() {
    const { writable } = this;
    this.writable = null;
    await writable.close();  // the swap file takes the name only now
  }

  async finish() {}

  async abort() {
    if (this.writable) await this.writable.abort().catch(() => {});
  }
}

class PickedTreeSaver {
  constructor(folder, entries) {
    this.folder = folder;
    this.entries = entries;
    this.savedAs = `${folder.name}/`;
    this.keepsCommitted = true;  // files verified before a failure stay, as with peer recv
    this.directories = new Map([['', folder]]);
    this.created = [];  // [parent handle, name, kind] of what we made, newest last
    this.writable = null;
    this.file = null;
  }

  async exists(parent, name) {
    for (const kind of ['getFileHandle', 'getDirectoryHandle']) {
      try {
        await parent[kind](name);
        return true;
      } catch (error) {
        if (error.name !== 'NotFoundError' && error.name !== 'TypeMismatchError') throw error;
      }
    }
    return false;
  }

  async directory(path) {
    if (this.directories.has(path)) return this.directories.get(path);
    const slash = path.lastIndexOf('/');
    const parent = await this.directory(slash < 0 ? '' : path.slice(0, slash));
    const name = baseName(path);
    if (slash < 0 && await this.exists(parent, name)) throw new Error(`${path} already exists in ${this.folder.name}`);
    let handle;
    try {
      handle = await parent.getDirectoryHandle(name);
    } catch (error) {
      if (error.name !== 'NotFoundError') throw error;
      handle = await parent.getDirectoryHandle(name, { create: true });
      this.created.push([parent, name]);
    }
    this.directories.set(path, handle);
    return handle;
  }

  async openFile(entry) {
    const slash = entry.path.lastIndexOf('/');
    const parent = await this.directory(slash < 0 ? '' : entry.path.slice(0, slash));
    const name = baseName(entry.path);
    if (await this.exists(parent, name)) throw new Error(`${entry.path} already exists in ${this.folder.name}`);
    const handle = await parent.getFileHandle(name, { create: true });
    this.file = [parent, name];
    this.writable = await handle.createWritable();
  }

  write(bytes) { return this.writable.write(bytes); }

  async commitFile() {
    const { writable } = this;
    this.writable = null;
    this.file = null;
    await writable.close();
  }

  async finish() {
    for (const entry of this.entries) if (entry.kind === 'dir') await this.directory(entry.path);
  }

  async abort() {
    // Committed files stay, each complete and verified; the unfinished one and the
    // directories we made that are still empty go.
    if (this.writable) await this.writable.abort().catch(() => {});
    if (this.file) await this.file[0].removeEntry(this.file[1]).catch(() => {});
    for (const [parent, name] of this.created.reverse()) await parent.removeEntry(name).catch(() => {});
  }
}
