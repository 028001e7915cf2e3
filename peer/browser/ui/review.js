// A code shaped like a generated one with a word outside the list is almost surely a typo,
// and trying it would spend one of the sender's three attempts: ask first, as `peer recv`
// does (peer/codes.py review_code, the same rule). Anything else, a password someone
// chose, goes through as typed.

import { closestWord, normalizeCode } from '../lib/codes.js';

const MIN_ENTROPY_BITS = 32;  // peer/codes.py: the shortest code we generate carries this much
const NAMEPLATE = /^[0-9]{1,5}$/u;
const CODE_WORD = /^[a-z]+$/u;

// -> null (try it), or {unknown: [words], correction: code or null}.
export function reviewCode(text, words) {
  const parts = normalizeCode(text).split('-');
  if (parts.length < 2 || !NAMEPLATE.test(parts[0])) return null;
  const [nameplate, ...typed] = parts;
  const fewest = Math.ceil(MIN_ENTROPY_BITS / Math.log2(words.length));
  if (typed.length < fewest || !typed.every((word) => CODE_WORD.test(word))) return null;
  const known = new Set(words);
  const unknown = typed.filter((word) => !known.has(word));
  if (!unknown.length || unknown.length === typed.length) return null;
  const fixed = typed.map((word) => (known.has(word) ? word : closestWord(word, words)));
  const correction = fixed.includes(null) ? null : [nameplate, ...fixed].join('-');
  return { unknown, correction };
}

export function describeSuspect({ unknown, correction }) {
  const names = unknown.map((word) => `“${word}”`).join(' and ');
  const verb = unknown.length === 1 ? 'is' : 'are';
  return correction
    ? `${names} ${verb} not in the word list. Did you mean ${correction}?`
    : `${names} ${verb} not in the word list.`;
}
