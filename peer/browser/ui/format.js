// Numbers and names for people, written like the Python peer prints them
// (peer/offer.py format_size), so both ends of a transfer read the same.

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

// 0 B, 999 B, 1.5 KiB, 3.0 GiB.
export function formatSize(size) {
  const n = Number(size);
  if (n < 1024) return `${n} B`;
  let value = n;
  let unit = UNITS[0];
  for (unit of UNITS) {
    value /= 1024;
    if (value < 1024) break;
  }
  return `${value.toFixed(1)} ${unit}`;
}

export function formatRate(bytesPerSecond) {
  if (!Number.isFinite(bytesPerSecond) || bytesPerSecond <= 0) return '';
  return `${formatSize(Math.round(bytesPerSecond))}/s`;
}

// Seconds left as "42 s", "3 min 05 s", "2 h 10 min"; empty when unknown.
export function formatEta(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '';
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
}

export function plural(count, word) {
  return `${count} ${word}${count === 1 ? '' : 's'}`;
}

// Names come from the other peer: anything that could rearrange or hide text on screen
// (controls, line separators, bidi overrides) is shown as U+FFFD, the same set as the
// Python peer's prompt (peer/offer.py printable).
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/gu;

export function printable(text) {
  return String(text).replace(UNPRINTABLE, '\ufffd');
}

// The first line of an error's message: what the user sees, never a stack.
export function oneLine(error) {
  if (error && error.name === 'AbortError') return 'cancelled';
  const text = String((error && error.message) || error || 'unknown error');
  const line = text.split('\n', 1)[0].trim();
  return line || 'unknown error';
}

// A message from lib/ (lower case, no full stop, like the Python peer's) as a sentence.
export function sentence(text) {
  const line = String(text);
  return line.charAt(0).toUpperCase() + line.slice(1);
}
