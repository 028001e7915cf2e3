// What an offer holds, in the words `peer recv` uses in its prompt (peer/offer.py summary
// and listing): every top-level item up to MAX_LISTED, then how many more, and always the
// hidden paths, nested ones included, so a harmless name cannot hide `.git/hooks/...`.

import { formatSize, plural, printable } from './format.js';

export const MAX_LISTED = 20;
export const MAX_HIDDEN_LISTED = 10;

const isHidden = (path) => path.startsWith('.') || path.includes('/.');

// entries: [{path, kind: 'file' | 'dir', size}] in offer order (size null when unknown).
export function describe(entries, { skipped = [] } = {}) {
  const tops = [];
  const perTop = new Map();
  const parents = new Set();
  const hidden = [];
  let files = 0;
  let bytes = 0;
  let sizesKnown = true;
  for (const entry of entries) {
    const slash = entry.path.indexOf('/');
    const top = slash < 0 ? entry.path : entry.path.slice(0, slash);
    if (slash < 0) tops.push(entry);
    else parents.add(entry.path.slice(0, entry.path.lastIndexOf('/')));
    if (entry.kind === 'file') {
      files += 1;
      if (entry.size == null) sizesKnown = false;
      bytes += Number(entry.size || 0);
      const sums = perTop.get(top) || { files: 0, bytes: 0 };
      sums.files += 1;
      sums.bytes += Number(entry.size || 0);
      perTop.set(top, sums);
    }
    if (isHidden(entry.path)) hidden.push(entry);
  }
  // A hidden path is named by its files (and its empty directories), not by each level.
  const hiddenPaths = hidden
    .filter((entry) => entry.kind === 'file' || !parents.has(entry.path))
    .map((entry) => entry.path);

  let size = formatSize(bytes);
  if (!sizesKnown) size = bytes ? `${size} and more` : 'size unknown';
  const headline = tops.length === 1 && tops[0].kind === 'file'
    ? `${printable(tops[0].path)} (${size})`
    : `${plural(files, 'file')}, ${size}`;

  const names = tops.slice(0, MAX_LISTED).map((entry) => {
    if (entry.kind === 'file') {
      return { name: printable(entry.path), detail: entry.size == null ? 'size unknown' : formatSize(entry.size) };
    }
    const sums = perTop.get(entry.path) || { files: 0, bytes: 0 };
    return { name: `${printable(entry.path)}/`, detail: `folder, ${plural(sums.files, 'file')}, ${formatSize(sums.bytes)}` };
  });
  if (tops.length > MAX_LISTED) names.push(`and ${tops.length - MAX_LISTED} more`);
  // One plain file needs no list under a headline that already names it.
  const listed = tops.length === 1 && tops[0].kind === 'file' ? [] : names;

  return {
    headline,
    names: listed,
    hidden: listLine('Includes hidden paths: ', hiddenPaths),
    skipped: skipped.length
      ? listLine(`The sender skipped ${plural(skipped.length, 'unreadable file')}: `, skipped)
      : '',
    files,
    bytes,
  };
}

function listLine(prefix, paths) {
  if (!paths.length) return '';
  const shown = paths.slice(0, MAX_HIDDEN_LISTED).map(printable).join(', ');
  const more = paths.length - MAX_HIDDEN_LISTED;
  return prefix + shown + (more > 0 ? ` and ${more} more` : '');
}
