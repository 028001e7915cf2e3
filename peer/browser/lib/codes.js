// Transfer codes, as peer/codes.py and peer/nameplates.py make and read them: a nameplate
// (100..999) and three words of the EFF large list, e.g. 417-cobalt-lemon-unicycle. The whole
// code is the spoke password; the nameplate is public, the words are the secret.

import { utf8 } from './bytes.js';

export const SEPARATOR = '-';
export const DEFAULT_WORDS = 3;
const NAMEPLATE_LOW = 100;
const NAMEPLATE_HIGH = 999;
const MAX_NAMEPLATE = 0xffff;
const MAX_SUGGESTION_DISTANCE = 2;
const SEPARATOR_RUN = /[\s-]+/u;
const NAMEPLATE = /^[0-9]{1,5}$/;

const loaded = new Map();

/** The word list (served by the relay as words.txt), fetched once per URL. */
export function loadWords(url = 'words.txt') {
  const key = String(url);
  if (!loaded.has(key)) {
    const promise = fetch(url).then(async (response) => {
      if (!response.ok) throw new Error(`could not load the word list (HTTP ${response.status})`);
      const words = (await response.text()).split('\n').map((w) => w.trim()).filter(Boolean);
      if (!words.length) throw new Error('the word list is empty');
      return words;
    });
    promise.catch(() => loaded.delete(key)); // a failed fetch may be tried again
    loaded.set(key, promise);
  }
  return loaded.get(key);
}

/** A uniform integer in 0..n-1 from the CSPRNG, by rejection sampling (no modulo bias). */
export function randomBelow(n) {
  if (!Number.isInteger(n) || n < 1 || n > 2 ** 32) throw new RangeError(`cannot draw below ${n}`);
  const limit = Math.floor(2 ** 32 / n) * n;
  const cell = new Uint32Array(1);
  for (;;) {
    crypto.getRandomValues(cell);
    if (cell[0] < limit) return cell[0] % n;
  }
}

/** A fresh code: a nameplate 100..999 and `count` words. */
export function generateCode(words, count = DEFAULT_WORDS) {
  if (!words || words.length < 2) throw new Error('no word list to make a code from');
  const parts = [String(NAMEPLATE_LOW + randomBelow(NAMEPLATE_HIGH - NAMEPLATE_LOW + 1))];
  for (let i = 0; i < count; i++) parts.push(words[randomBelow(words.length)]);
  return parts.join(SEPARATOR);
}

/** Case dropped, ends trimmed, every run of spaces and dashes one dash. */
export function normalizeCode(text) {
  return text.trim().toLowerCase().split(SEPARATOR_RUN).filter(Boolean).join(SEPARATOR);
}

function asSet(words) {
  return words instanceof Set ? words : new Set(words);
}

/**
 * The exact spoke password for what a user typed. Text that is one of our codes once
 * normalised (an optional nameplate, then list words) is normalised; anything else (a bob
 * password, a chosen passphrase) is used as typed, only trimmed: changing its case or
 * spaces would turn a right password into a wrong one.
 */
export function passwordBytes(text, wordSet) {
  const stripped = text.trim();
  const normal = normalizeCode(stripped);
  let parts = normal.split(SEPARATOR);
  if (parts.length && NAMEPLATE.test(parts[0])) parts = parts.slice(1);
  const known = asSet(wordSet);
  if (parts.length && parts.every((part) => known.has(part))) return utf8(normal);
  return utf8(stripped);
}

/**
 * The nameplate a code (string or password bytes) starts with: 1 to 5 ASCII digits then a
 * dash, at most 65535; else null.
 */
export function nameplateOf(code) {
  const bytes = typeof code === 'string' ? utf8(code) : code;
  const dash = bytes.indexOf(0x2d);
  if (dash < 1 || dash > 5) return null;
  let value = 0;
  for (let i = 0; i < dash; i++) {
    if (bytes[i] < 0x30 || bytes[i] > 0x39) return null;
    value = value * 10 + (bytes[i] - 0x30);
  }
  return value <= MAX_NAMEPLATE ? value : null;
}

/** The list words starting with `prefix` (what word completion offers). */
export function completions(prefix, words) {
  const lower = prefix.toLowerCase();
  return words.filter((word) => word.startsWith(lower));
}

/** The list word closest to `word` (at most 2 edits, a swap of neighbours counting as one),
 * ties to the first in list order; null when none is that close. */
export function closestWord(word, words) {
  let best = null;
  let bestDistance = MAX_SUGGESTION_DISTANCE + 1;
  for (const candidate of words) {
    if (Math.abs(candidate.length - word.length) >= bestDistance) continue;
    const distance = editDistance(word, candidate, bestDistance - 1);
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best;
}

// Optimal string alignment distance, giving up (limit + 1) once it must exceed `limit`.
function editDistance(a, b, limit) {
  let before = [];
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        current[j] = Math.min(current[j], before[j - 2] + 1);
      }
    }
    if (Math.min(...current) > limit && Math.min(...previous) >= limit) return limit + 1;
    before = previous;
    previous = current;
  }
  return Math.min(previous[b.length], limit + 1);
}
