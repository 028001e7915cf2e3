// The progress block shared by both views: bar, bytes of total, rate, ETA, current file.

import { role } from './dom.js';
import { formatEta, formatRate, formatSize, printable } from './format.js';

export class ProgressView {
  constructor(root) {
    this.bar = role(root, 'bar');
    this.bytes = role(root, 'bytes');
    this.rate = role(root, 'rate');
    this.eta = role(root, 'eta');
    this.current = role(root, 'current');
  }

  reset() {
    this.bar.value = 0;
    this.bar.removeAttribute('value');
    for (const element of [this.bytes, this.rate, this.eta, this.current]) element.textContent = '';
  }

  // {bytes, total, file, rate, eta} as receiving.js and sending.js report it; the total
  // may be unknown (a sender's pipe), then the bar stays indeterminate.
  update({ bytes = 0, total = null, file = '', rate = 0, eta = null } = {}) {
    const known = typeof total === 'number' && total > 0;
    if (known) {
      this.bar.max = total;
      this.bar.value = Math.min(bytes, total);
      this.bytes.textContent = `${formatSize(bytes)} of ${formatSize(total)}`;
    } else {
      this.bar.removeAttribute('value');
      this.bytes.textContent = formatSize(bytes);
    }
    this.rate.textContent = formatRate(rate);
    const left = formatEta(eta);
    this.eta.textContent = left && known && bytes < total ? `${left} left` : '';
    this.current.textContent = file ? printable(file) : '';
  }

  finish(total) {
    if (typeof total === 'number' && total > 0) {
      this.bar.max = total;
      this.bar.value = total;
    }
  }
}
