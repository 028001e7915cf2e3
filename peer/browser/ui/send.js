// The send view: pick or drop files and folders, get a code (shown only once the relay has
// registered us, so nobody reads out a code for a relay that is down), the receiver's
// verification string, progress, and the receiver's acknowledgement.

import { generateCode, loadWords } from '../lib/codes.js';
import { sendRendezvous } from '../lib/rendezvous.js';
import { selectionFrom, selectionFromDrop, sendFiles } from '../lib/sending.js';
import { action, clearResult, copy, fillList, role, setResult, showStage } from './dom.js';
import { formatSize, oneLine, plural, sentence } from './format.js';
import { describe } from './listing.js';
import { ProgressView } from './progress.js';

export class SendView {
  constructor(view, { base }) {
    this.view = view;
    this.base = base;
    this.items = [];        // [{path, file}] picked so far ({path} alone: an empty folder)
    this.selection = null;  // selectionFrom(items): the offer to make, checked
    this.controller = null;
    this.status = role(view, 'status');
    this.result = role(view, 'result');
    this.share = role(view, 'share');
    this.progressBlock = role(view, 'send-progress');
    this.progress = new ProgressView(this.progressBlock);
    this.files = role(view, 'send-files');
    this.folder = role(view, 'send-folder');
    this.dropzone = role(view, 'dropzone');

    this.pickError = role(view, 'pick-error');
    const picked = (input) => {
      this.add(Array.from(input.files, (file) => ({ path: file.webkitRelativePath || file.name, file })));
      input.value = '';
    };
    for (const input of [this.files, this.folder]) input.addEventListener('change', () => picked(input));
    this.listenForDrops();
    action(view, 'send')[0].addEventListener('click', () => this.start());
    action(view, 'clear')[0].addEventListener('click', () => this.add(null));
    for (const button of action(view, 'cancel')) button.addEventListener('click', () => this.cancel());
    for (const button of action(view, 'again')) button.addEventListener('click', () => this.reset());
    action(view, 'copy-command')[0].addEventListener('click', (event) => {
      copy(role(view, 'command').textContent, event.currentTarget, role(view, 'command'));
    });
    action(view, 'copy-link')[0].addEventListener('click', (event) => {
      copy(role(view, 'link').textContent, event.currentTarget, role(view, 'link'));
    });
    this.reset();
    // Files picked while the page's modules were still loading fired their change event
    // before anyone listened: take them now rather than lose them without a word.
    for (const input of [this.files, this.folder]) if (input.files.length) picked(input);
  }

  get busy() {
    return this.controller !== null;
  }

  listenForDrops() {
    // Dropping anywhere on the send view works; the dashed zone only shows it.
    this.view.addEventListener('dragover', (event) => {
      if (this.busy) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = 'copy';
      this.dropzone.classList.add('over');
    });
    this.view.addEventListener('dragleave', (event) => {
      if (!this.view.contains(event.relatedTarget)) this.dropzone.classList.remove('over');
    });
    this.view.addEventListener('drop', async (event) => {
      if (this.busy) return;
      event.preventDefault();
      this.dropzone.classList.remove('over');
      let dropped;
      try {
        dropped = await selectionFromDrop(event.dataTransfer);
      } catch (error) {
        this.showPickError(oneLine(error));
        return;
      }
      this.add(itemsOf(dropped));
    });
  }

  // Picks add up (files, then a folder, then a drop); a name picked again replaces the
  // earlier one. null clears. A pick the receiver would refuse (a bad name, a file and a
  // folder of one name) is left out, with the reason.
  add(picked) {
    this.showPickError('');
    if (picked === null) {
      this.items = [];
      this.selection = null;
    } else if (picked.length) {
      const byPath = new Map(this.items.map((item) => [item.path, item]));
      for (const item of picked) byPath.set(item.path, item);
      const items = [...byPath.values()];
      try {
        this.selection = selectionFrom(items);
        this.items = items;
      } catch (error) {
        this.showPickError(oneLine(error));
      }
    }
    const block = role(this.view, 'selection');
    block.hidden = this.items.length === 0;
    if (block.hidden) return;
    const shown = describe(this.selection.offer.entries);
    role(this.view, 'selection-summary').textContent = `To send: ${shown.headline}`;
    const names = [...shown.names];
    if (shown.hidden) names.push(shown.hidden);
    fillList(role(this.view, 'selection-names'), names);
    action(this.view, 'send')[0].focus();
  }

  showPickError(line) {
    this.pickError.textContent = sentence(line);
    this.pickError.hidden = !line;
  }

  reset() {
    if (this.busy) return;
    clearResult(this.result);
    this.share.hidden = true;
    role(this.view, 'send-check-row').hidden = true;
    this.progressBlock.hidden = true;
    this.progress.reset();
    this.status.textContent = '';
    this.add(null);
    showStage(this.view, 'pick');
  }

  focus() {}

  async start() {
    if (this.busy || !this.selection) return;
    const controller = new AbortController();
    this.controller = controller;
    const { signal } = controller;
    const { selection } = this;
    clearResult(this.result);
    this.status.textContent = 'Connecting to the relay…';
    showStage(this.view, 'waiting');
    let outcome;
    try {
      const words = await loadWords();
      const code = generateCode(words);
      const met = await sendRendezvous({
        base: this.base,
        code,
        words,
        signal,
        onStatus: (text, stage) => {
          // Only once the relay holds our registration is the code worth reading out.
          if (stage === 'registered' && this.share.hidden) this.showCode(code);
          this.status.textContent = sentence(text);
        },
      });
      this.share.hidden = true;  // used up: the code opens no other transfer
      role(this.view, 'send-check').textContent = met.verification;
      role(this.view, 'send-check-row').hidden = false;
      outcome = await sendFiles(met, selection, {
        onStatus: (text) => { this.status.textContent = sentence(text); },
        onProgress: (progress) => {
          this.progressBlock.hidden = false;
          this.progress.update(progress);
        },
      });
    } catch (error) {
      this.fail(signal.aborted ? 'You cancelled.' : oneLine(error));
      return;
    }
    this.progress.finish(selection.offer.totalBytes);
    this.controller = null;
    setResult(this.result, 'done',
      `The receiver confirmed ${plural(Number(outcome.files), 'file')}, ${formatSize(Number(outcome.bytes))}`);
    showStage(this.view, 'outcome');
  }

  showCode(code) {
    role(this.view, 'code').textContent = code;
    // The code in its own box, so a narrow line breaks before it rather than inside it.
    const whole = document.createElement('span');
    whole.className = 'whole';
    whole.textContent = code;
    role(this.view, 'command').replaceChildren(`peer recv --relay ${relayAddress(this.base)} `, whole);
    const link = new URL(this.base);
    link.hash = `receive/${code}`;
    role(this.view, 'link').textContent = link.href;
    this.share.hidden = false;
  }

  cancel() {
    if (this.controller) this.controller.abort();
  }

  fail(line) {
    this.controller = null;
    setResult(this.result, 'failed', line);
    showStage(this.view, 'outcome');
  }
}

// The relay address `peer recv --relay` takes for the relay serving this page: its
// WebSocket port, under the same prefix (docs/websocket.md).
export function relayAddress(base) {
  const url = new URL(base);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = '';
  url.hash = '';
  return url.href;
}

// A selection back as the items it was made of, to add more to it.
function itemsOf(selection) {
  return selection.offer.entries.map((entry, i) => (entry.kind === 'file'
    ? { path: entry.path, file: selection.files[i] }
    : { path: entry.path }));
}
