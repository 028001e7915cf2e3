// The receive view: a code, the handshake, the offer to accept or decline, progress, and
// one line at the end. The protocol lives in lib/; this only shows it and asks.

import { receiveRendezvous } from '../lib/rendezvous.js';
import { receiveFiles } from '../lib/receiving.js';
import { prepareSaver } from '../lib/saving.js';
import { action, clearResult, copy, fillList, role, setResult, showStage } from './dom.js';
import { formatSize, oneLine, plural, printable, sentence } from './format.js';
import { describe } from './listing.js';
import { ProgressView } from './progress.js';
import { CodeCompleter } from './completion.js';
import { describeSuspect, reviewCode } from './review.js';

export class ReceiveView {
  constructor(view, { base, words, complete }) {
    this.view = view;
    this.base = base;
    this.form = view.querySelector('[data-stage="code"]');
    this.input = role(view, 'code-input');
    this.status = role(view, 'status');
    this.result = role(view, 'result');
    this.met = null;
    this.summary = null;
    this.progress = new ProgressView(view.querySelector('[data-stage="progress"]'));
    this.completer = new CodeCompleter(this.input, role(view, 'suggestions'), { words, complete });
    this.words = words;
    this.review = role(view, 'review');
    this.correction = null;
    this.controller = null;
    this.answer = null;  // the pending offer's resolve function

    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.start(this.input.value);
    });
    this.input.addEventListener('input', () => this.showReview(false));
    action(view, 'use-correction')[0].addEventListener('click', () => {
      this.input.value = this.correction;
      this.start(this.correction, { asTyped: true });
    });
    action(view, 'as-typed')[0].addEventListener('click', () => this.start(this.input.value, { asTyped: true }));
    for (const button of action(view, 'cancel')) button.addEventListener('click', () => this.cancel());
    for (const button of action(view, 'again')) button.addEventListener('click', () => this.reset());
    action(view, 'accept')[0].addEventListener('click', () => this.accept());
    action(view, 'decline')[0].addEventListener('click', () => this.decline());
    action(view, 'copy-text')[0].addEventListener('click', (event) => {
      const source = role(view, 'text-message');
      copy(source.textContent, event.currentTarget, source);
    });
    this.reset();
  }

  get busy() {
    return this.controller !== null;
  }

  reset() {
    if (this.busy) return;
    clearResult(this.result);
    role(this.view, 'text-block').hidden = true;
    role(this.view, 'text-message').textContent = '';
    this.progress.reset();
    this.status.textContent = '';
    this.showReview(false);
    showStage(this.view, 'code');
  }

  focus() {
    if (!this.busy && !this.form.hidden) this.input.focus();
  }

  // Also what `#receive/CODE` calls: the handshake starts at once, but nothing is saved
  // before the user accepts the offer.
  async start(typed, { asTyped = false } = {}) {
    if (this.busy) return;
    const code = typed.trim();
    this.input.value = code;
    this.showReview(false);
    if (!code) {
      showStage(this.view, 'code');
      this.input.focus();
      return;
    }
    if (!asTyped && await this.questioned(code)) return;
    if (this.busy) return;  // a second start while the word list loaded
    const controller = new AbortController();
    this.controller = controller;
    const { signal } = controller;
    clearResult(this.result);
    role(this.view, 'text-block').hidden = true;
    this.status.textContent = 'Connecting to the relay…';
    showStage(this.view, 'waiting');
    let outcome;
    try {
      const words = await this.words.catch(() => undefined);
      const met = await receiveRendezvous({
        base: this.base, code, signal, words,
        onStatus: (text) => { this.status.textContent = sentence(text); },
      });
      this.met = met;
      this.status.textContent = 'Waiting for the offer…';
      outcome = await receiveFiles(met, {
        decide: (summary) => this.ask(summary, met),
        onProgress: (progress) => this.progress.update(progress),
      });
    } catch (error) {
      this.finish('failed', signal.aborted ? 'You cancelled.' : oneLine(error));
      return;
    }
    if (outcome.text !== null && outcome.text !== undefined) {
      role(this.view, 'text-message').textContent = outcome.text;
      role(this.view, 'text-block').hidden = false;
      this.finish('done', 'Received a text message');
      return;
    }
    this.finish('done', this.doneLine(outcome));
  }

  // Whether the code looks mistyped; then the question is shown instead of a handshake.
  async questioned(code) {
    let words;
    try {
      words = await this.words;
    } catch {
      return false;  // no list, no review: the handshake still tells a wrong code
    }
    const suspect = reviewCode(code, words);
    if (!suspect) return false;
    this.correction = suspect.correction;
    role(this.view, 'review-text').textContent = describeSuspect(suspect);
    action(this.view, 'use-correction')[0].hidden = !suspect.correction;
    this.showReview(true);
    showStage(this.view, 'code');
    return true;
  }

  // The question replaces the Receive button: one primary action at a time.
  showReview(shown) {
    this.review.hidden = !shown;
    action(this.view, 'receive')[0].hidden = shown;
  }

  doneLine({ files, bytes, savedAs }) {
    const where = savedAs ? `, saved as ${printable(savedAs)}` : '';
    return `Received ${plural(Number(files), 'file')}, ${formatSize(Number(bytes))}${where}`;
  }

  // Shows the offer and waits for a click; receiving.js calls it once the offer is read.
  ask(summary, met) {
    this.summary = summary;
    const text = summary.text !== null && summary.text !== undefined;
    const shown = describe(summary.entries, { skipped: summary.skipped || [] });
    role(this.view, 'offer-summary').textContent = text
      ? `The sender offers a text message (${formatSize(new TextEncoder().encode(summary.text).length)})`
      : `The sender offers ${shown.headline}`;
    fillList(role(this.view, 'offer-names'), text ? [] : shown.names);
    const hidden = role(this.view, 'offer-hidden');
    hidden.textContent = shown.hidden;
    hidden.hidden = !shown.hidden;
    const skipped = role(this.view, 'offer-skipped');
    skipped.textContent = shown.skipped;
    skipped.hidden = !shown.skipped;
    role(this.view, 'offer-from').textContent = printable(met.peerIdentity || 'unknown');
    role(this.view, 'offer-check').textContent = met.verification;
    this.progress.reset();
    this.progress.update({ bytes: 0, total: summary.sizesKnown ? summary.totalBytes : null });
    showStage(this.view, 'offer');
    action(this.view, 'accept')[0].focus();
    return new Promise((resolve, reject) => {
      this.answer = { resolve, reject };
    });
  }

  // Runs inside the click: the File System Access pickers need that user activation, so
  // prepareSaver is called here and now, before any await. A text needs no saver.
  accept() {
    if (!this.answer) return;
    const { resolve, reject } = this.answer;
    if (this.summary.text !== null && this.summary.text !== undefined) {
      this.answer = null;
      showStage(this.view, 'waiting');
      resolve({ accept: true });
      return;
    }
    const prepared = prepareSaver(this.summary, { preferPicker: true, nameplate: this.met?.nameplate ?? '' });
    prepared.then((saver) => {
      this.answer = null;
      showStage(this.view, 'progress');
      resolve({ accept: true, saver });
    }, (error) => {
      // Closing the save dialog is no failure: the offer stays until Accept or Decline.
      if (/cancelled saving/u.test(oneLine(error))) return;
      this.answer = null;
      reject(error);
    });
  }

  decline() {
    if (!this.answer) return;
    const { resolve } = this.answer;
    this.answer = null;
    this.status.textContent = 'Declining…';
    showStage(this.view, 'waiting');
    resolve({ accept: false });
  }

  cancel() {
    if (this.answer) {
      this.answer.reject(new DOMException('cancelled', 'AbortError'));
      this.answer = null;
    }
    if (this.controller) this.controller.abort();
  }

  finish(state, line) {
    this.controller = null;
    this.answer = null;
    setResult(this.result, state, line);
    if (state === 'done') this.progress.finish(Number(this.summary?.totalBytes ?? 0));
    showStage(this.view, 'outcome');
  }
}
