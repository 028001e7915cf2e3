// The offer document (docs/transfer.md §3): built by the browser sender from picked files,
// parsed and checked by the browser receiver with exactly peer/offer.py's rules, and
// summarised for the page. One rule book for names, `nameProblem`, as in Python.

import { CAPABILITY, ProtocolError, UNPRINTABLE, printable } from './messages.js';

export const MAX_OFFER_BYTES = 64 * 1024 * 1024;
export const MAX_OFFER_ENTRIES = 100_000;
export const MAX_TEXT_BYTES = 1024 * 1024;
export const MAX_PATH_BYTES = 4096;
export const MAX_COMPONENT_BYTES = 255;
const MAX_FILE_SIZE = (1n << 63n) - 1n;
const FILE_ID = /^[0-9a-f]{1,64}$/;

export const FEATURES = Object.freeze({
  TEXT: 'text', UNKNOWN_SIZE: 'unknown-size', BIG_RECORDS: 'big-records',
  ZSTD: 'zstd', RESUME: 'resume', PACK_ACK: 'pack-ack',
});

const encoder = new TextEncoder();
const utf8Length = (text) => encoder.encode(text).length;
const strict = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

// --- names ---------------------------------------------------------------------------------

/** Why `path` is unsafe as an offered name, or null: peer/offer.py's name_problem. */
export function nameProblem(path) {
  if (typeof path !== 'string') return 'is not a string';
  if (!path) return 'is empty';
  if (!path.isWellFormed()) return 'is not valid UTF-8';  // a lone surrogate has no UTF-8
  if (utf8Length(path) > MAX_PATH_BYTES) return `is longer than ${MAX_PATH_BYTES} bytes`;
  const bad = path.match(UNPRINTABLE);
  if (bad) return `contains the control character U+${bad[0].codePointAt(0).toString(16).toUpperCase().padStart(4, '0')}`;
  if (path.includes('\\')) return 'contains a backslash';
  if (path.startsWith('/')) return 'is an absolute path';
  for (const component of path.split('/')) {
    if (!component) return 'has an empty component';
    if (component === '.' || component === '..') return `contains a '${component}' component`;
    if (utf8Length(component) > MAX_COMPONENT_BYTES) return `has a component longer than ${MAX_COMPONENT_BYTES} bytes`;
    if (/^[A-Za-z]:/.test(component)) return 'looks like a Windows drive letter';
  }
  return null;
}

/** `path` as a file system that normalises Unicode sees it: NFC. */
export function sameNameKey(path) {
  return /^[\x00-\x7f]*$/.test(path) ? path : path.normalize('NFC');
}

const shown = (path) => JSON.stringify(typeof path === 'string' ? printable(path) : path ?? null);

// --- integers as Python's json sees them ---------------------------------------------------

// JSON.parse turns 1.0 into 1 and rounds 2^63 - 1; Python keeps the float a float and the
// integer exact. The reviver reads each number's source text so the verdicts are the same.
class JsonFloat {
  constructor(value) { this.value = value; }
}

function revive(key, value, context) {
  if (typeof value !== 'number') return value;
  const source = context?.source ?? String(value);
  if (!/^-?\d+$/.test(source)) return new JsonFloat(value);
  return Number.isSafeInteger(value) ? value : BigInt(source);
}

const isInt = (value) => typeof value === 'bigint' || (typeof value === 'number' && Number.isInteger(value));

/** Python's `==` between a parsed JSON value and an exact count. */
function sameNumber(value, count) {
  const exact = BigInt(count);
  if (typeof value === 'boolean') return BigInt(Number(value)) === exact;
  if (value instanceof JsonFloat) return Number.isInteger(value.value) && BigInt(value.value) === exact;
  if (isInt(value)) return BigInt(value) === exact;
  return false;
}

function countKinds(bytes) {
  // Every entry has a "kind" key, and inside a JSON string a quote is escaped, so names
  // cannot add to the count: an offer over the cap costs a count, not a parse.
  const pattern = [0x22, 0x6b, 0x69, 0x6e, 0x64, 0x22];
  let count = 0;
  for (let at = bytes.indexOf(0x22); at !== -1 && at <= bytes.length - 6; at = bytes.indexOf(0x22, at)) {
    let i = 1;
    while (i < 6 && bytes[at + i] === pattern[i]) i++;
    if (i === 6) { count++; at += 6; } else at += 1;  // non-overlapping, as bytes.count
  }
  return count;
}

// --- the offer ---------------------------------------------------------------------------

/**
 * Check entries as peer/offer.py's Offer does and return {fileCount, totalBytes} (exact,
 * BigInt). Entries are {kind: 'file'|'dir', path, size, executable}. Throws Error.
 */
function checkEntries(entries, text, skipped) {
  if (text !== null && text !== undefined) {
    if (typeof text !== 'string') throw new Error('the text is not a string');
    if (!text.isWellFormed()) throw new Error('the text is not valid UTF-8');
    if (utf8Length(text) > MAX_TEXT_BYTES) throw new Error('the text is over 1.0 MiB; send it as a file');
    if (entries.length) throw new Error('an offer carries either a text or entries, not both');
  } else if (!entries.length) {
    throw new Error('the offer is empty');
  }
  if (skipped.length > MAX_OFFER_ENTRIES || !skipped.every((path) => typeof path === 'string')) {
    throw new Error('the list of skipped paths is malformed');
  }
  if (entries.length > MAX_OFFER_ENTRIES) throw new Error(`the offer has over ${MAX_OFFER_ENTRIES.toLocaleString('en')} entries (the limit)`);
  const directories = new Set();
  const seen = new Set();
  const normalised = new Set();
  let files = 0;
  let total = 0n;
  for (const entry of entries) {
    const problem = nameProblem(entry.path);
    if (problem) throw new Error(`the name ${shown(entry.path)} ${problem}`);
    if (entry.kind === 'file') {
      if (entry.size !== null && !(isInt(entry.size) && BigInt(entry.size) >= 0n && BigInt(entry.size) <= MAX_FILE_SIZE)) {
        throw new Error(`${printable(entry.path)}: invalid size`);
      }
      if (typeof entry.executable !== 'boolean') throw new Error(`${printable(entry.path)}: invalid executable flag`);
    }
    const key = sameNameKey(entry.path);
    if (seen.has(entry.path) || normalised.has(key)) {
      // Two spellings of one name (NFC and NFD) are one file where names are normalised.
      throw new Error(`${printable(entry.path)} is offered twice`);
    }
    seen.add(entry.path);
    normalised.add(key);
    const slash = entry.path.lastIndexOf('/');
    if (slash >= 0 && !directories.has(entry.path.slice(0, slash))) {
      // Also rules out a file used as a directory ("a" and "a/b").
      throw new Error(`${printable(entry.path)} comes before (or without) its directory ${printable(entry.path.slice(0, slash))}`);
    }
    if (entry.kind === 'dir') directories.add(entry.path);
    else {
      files += 1;
      total += BigInt(entry.size ?? 0);
    }
  }
  return { fileCount: files, totalBytes: total };
}

/**
 * Parse and check an OFFER document (bytes) exactly like peer/offer.py's Offer.from_json:
 * returns {offer, version, features}. `offer` is {entries, text, skipped, fileCount,
 * totalBytes, sizesKnown}; sizes are Numbers. Throws ProtocolError.
 */
export function parseOffer(bytes) {
  if (countKinds(bytes) > MAX_OFFER_ENTRIES) {
    throw new ProtocolError(`the offer has over ${MAX_OFFER_ENTRIES.toLocaleString('en')} entries (the limit)`);
  }
  let document;
  try {
    document = JSON.parse(strict.decode(bytes), revive);
  } catch (error) {
    throw new ProtocolError(`the offer is not valid JSON: ${error.name}`);
  }
  if (document === null || typeof document !== 'object' || Array.isArray(document)) {
    throw new ProtocolError('the offer is not a JSON object');
  }
  const version = document.version;
  if (!isInt(version)) throw new ProtocolError('the offer has no version');
  const features = 'features' in document ? document.features : [];
  if (!Array.isArray(features) || !features.every((f) => typeof f === 'string' && CAPABILITY.test(f))) {
    throw new ProtocolError("the offer's feature list is malformed");
  }
  const raw = document.entries;
  if (!Array.isArray(raw)) throw new ProtocolError('the offer has no entry list');
  if (raw.length > MAX_OFFER_ENTRIES) throw new ProtocolError(`the offer has over ${MAX_OFFER_ENTRIES.toLocaleString('en')} entries (the limit)`);
  const entries = [];
  for (const item of raw) {
    if (item === null || typeof item !== 'object' || Array.isArray(item)) throw new ProtocolError('an offer entry is not a JSON object');
    const { kind, path } = item;
    if (kind === 'file') {
      if (!('size' in item)) throw new ProtocolError(`the offer entry ${shown(path)} has no size`);
      const id = item.id ?? null;
      if (id !== null && !(typeof id === 'string' && FILE_ID.test(id))) throw new ProtocolError(`the offer entry ${shown(path)} has a malformed id`);
      const executable = 'executable' in item ? item.executable : false;
      entries.push({ kind, path, size: item.size, executable });
    } else if (kind === 'dir') {
      entries.push({ kind, path });  // a directory's other keys mean nothing
    } else {
      throw new ProtocolError(`an offer entry has an unknown kind ${shown(kind instanceof JsonFloat ? kind.value : String(kind))}`);
    }
  }
  const text = document.text ?? null;
  if (text !== null && typeof text !== 'string') throw new ProtocolError("the offer's text is not a string");
  const skipped = 'skipped' in document ? document.skipped : [];
  if (!Array.isArray(skipped) || !skipped.every((path) => typeof path === 'string')) {
    throw new ProtocolError("the offer's list of skipped paths is malformed");
  }
  let totals;
  try {
    totals = checkEntries(entries, text, skipped);
  } catch (error) {
    throw new ProtocolError(`invalid offer: ${error.message}`);
  }
  if (!sameNumber(document.file_count, totals.fileCount) || !sameNumber(document.total_bytes, totals.totalBytes)) {
    throw new ProtocolError("the offer's totals do not match its entries");
  }
  // Python takes sizes up to 2^63 - 1; past 2^53 a browser could not even count them.
  if (totals.totalBytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ProtocolError('the offer lists more bytes than a browser can count');
  }
  const offer = {
    entries: entries.map((entry) => (entry.kind === 'file' ? { ...entry, size: entry.size === null ? null : Number(entry.size) } : entry)),
    text,
    skipped,
    fileCount: totals.fileCount,
    totalBytes: Number(totals.totalBytes),
    sizesKnown: entries.every((entry) => entry.kind !== 'file' || entry.size !== null),
  };
  return { offer, version: typeof version === 'bigint' ? Number.MAX_SAFE_INTEGER : version, features };
}

/** What a receiver must support to take `offer` at all. */
export function neededFeatures(offer) {
  const needed = [];
  if (offer.text !== null && offer.text !== undefined) needed.push(FEATURES.TEXT);
  if (!offer.sizesKnown) needed.push(FEATURES.UNKNOWN_SIZE);
  return needed;
}

/** The OFFER document, compact UTF-8 JSON, byte for byte what peer/offer.py writes. */
export function offerDocument(offer, { version = 1, features = [] } = {}) {
  const document = {
    version,
    features: [...features].sort(),
    file_count: offer.fileCount,
    total_bytes: offer.totalBytes,
    entries: offer.entries.map((entry) => (entry.kind === 'file'
      ? { kind: 'file', path: entry.path, size: entry.size, executable: Boolean(entry.executable) }
      : { kind: 'dir', path: entry.path })),
  };
  if (offer.text !== null && offer.text !== undefined) document.text = offer.text;
  if (offer.skipped?.length) document.skipped = [...offer.skipped];
  return encoder.encode(JSON.stringify(document));
}

// --- building an offer from picked files -------------------------------------------------

// Python sorts names by code point; JavaScript's default sort compares UTF-16 units.
function byCodePoint(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i].codePointAt(0) - y[i].codePointAt(0);
  }
  return x.length - y.length;
}

/**
 * Build the offer for a selection: `[{path, file}]` (a File, or no `file` for an empty
 * directory). Every parent directory becomes an earlier `dir` entry; a directory's files
 * come first, then its subdirectories, depth-first in name order, as peer/source.py walks.
 * Returns {offer, files} where files[i] is the File of entries[i] (or null). Throws Error
 * with a one-line message for anything the receiver would refuse.
 */
export function buildOffer(selection) {
  const root = { files: new Map(), dirs: new Map() };
  const dirOf = (parts, where) => {
    let node = root;
    for (let i = 0; i < parts.length; i++) {
      const name = parts[i];
      if (node.files.has(name)) throw new Error(`cannot send ${parts.slice(0, i + 1).join('/')} as both a file and a folder`);
      if (!node.dirs.has(name)) node.dirs.set(name, { files: new Map(), dirs: new Map() });
      node = node.dirs.get(name);
    }
    return node;
  };
  for (const { path, file } of selection) {
    const problem = nameProblem(path);
    if (problem) throw new Error(`cannot send ${printable(String(path))}: its name ${problem}`);
    const parts = path.split('/');
    if (!file) {
      dirOf(parts);
      continue;
    }
    const name = parts.pop();
    const node = dirOf(parts);
    if (node.files.has(name) || node.dirs.has(name)) throw new Error(`cannot send two items named ${printable(path)}`);
    node.files.set(name, file);
  }
  const entries = [];
  const files = [];
  const walk = (node, prefix) => {
    for (const name of [...node.files.keys()].sort(byCodePoint)) {
      const file = node.files.get(name);
      entries.push({ kind: 'file', path: prefix + name, size: file.size, executable: false });
      files.push(file);
    }
    for (const name of [...node.dirs.keys()].sort(byCodePoint)) {
      entries.push({ kind: 'dir', path: prefix + name });
      files.push(null);
      walk(node.dirs.get(name), `${prefix}${name}/`);
    }
  };
  // At the top level, too, files first: one order for every level is easy to predict.
  walk(root, '');
  let totals;
  try {
    totals = checkEntries(entries, null, []);
  } catch (error) {
    throw new Error(`cannot send this selection: ${error.message}`);
  }
  const offer = {
    entries, text: null, skipped: [], fileCount: totals.fileCount, totalBytes: Number(totals.totalBytes), sizesKnown: true,
  };
  const size = offerDocument(offer).length;
  if (size > MAX_OFFER_BYTES) throw new Error('cannot send this selection: its list of names is over 64 MiB; send fewer files at once');
  return { offer, files };
}

// --- what the page shows -----------------------------------------------------------------

/**
 * The offer as the page shows it: {fileCount, totalBytes, sizesKnown, entries, topLevel
 * (names), topItems ([{name, directory, files, bytes}]), hidden (every dot-path, nested ones
 * included, named by its files and empty directories), skipped, text}.
 */
export function summarize(offer) {
  const topItems = [];
  const byTop = new Map();
  const parents = new Set();
  const hidden = [];
  for (const entry of offer.entries) {
    const slash = entry.path.indexOf('/');
    if (slash < 0) {
      const item = { name: entry.path, directory: entry.kind === 'dir', files: 0, bytes: 0, sizeKnown: true };
      topItems.push(item);
      byTop.set(entry.path, item);
    } else {
      parents.add(entry.path.slice(0, entry.path.lastIndexOf('/')));
    }
    if (entry.kind === 'file') {
      const item = byTop.get(slash < 0 ? entry.path : entry.path.slice(0, slash));
      item.files += 1;
      if (entry.size === null) item.sizeKnown = false;
      else item.bytes += entry.size;
    }
    if (entry.path.startsWith('.') || entry.path.includes('/.')) hidden.push(entry);
  }
  return {
    fileCount: offer.fileCount,
    totalBytes: offer.totalBytes,
    sizesKnown: offer.sizesKnown,
    entries: offer.entries,
    topLevel: topItems.map((item) => item.name),
    topItems,
    // A hidden path is named by its files (and its empty directories), not each level.
    hidden: hidden.filter((entry) => entry.kind === 'file' || !parents.has(entry.path)).map((entry) => entry.path),
    skipped: offer.skipped ?? [],
    text: offer.text ?? null,
  };
}
