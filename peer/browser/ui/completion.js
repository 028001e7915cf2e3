// Word completion for the code field: the last word typed is completed from the EFF list
// the codes come from, with a few suggestions to tap (phones have no Tab key).

const SHOWN = 6;
const WORDS_PER_CODE = 3;

export class CodeCompleter {
  // complete(prefix, words) -> matching words in order; words: a promise of the list.
  constructor(input, list, { words, complete }) {
    this.input = input;
    this.list = list;
    this.complete = complete;
    this.words = null;
    this.wordSet = new Set();
    this.current = [];
    words.then((loaded) => {
      this.words = loaded;
      this.wordSet = new Set(loaded);
      this.refresh();
    }, () => {});  // without the list the field still works, only without suggestions
    input.addEventListener('input', () => this.refresh());
    input.addEventListener('keydown', (event) => this.onKey(event));
    input.addEventListener('blur', () => setTimeout(() => this.hide(), 150));
    list.addEventListener('pointerdown', (event) => event.preventDefault());  // keep focus
    list.addEventListener('click', (event) => {
      const button = event.target.closest('button[data-word]');
      if (button) this.accept(button.dataset.word);
    });
  }

  // The word being typed: the text after the last space or dash.
  lastWord() {
    const match = /[^\s-]*$/u.exec(this.input.value);
    return match ? match[0].toLowerCase() : '';
  }

  refresh() {
    const prefix = this.lastWord();
    if (!this.words || !prefix || /^\d+$/u.test(prefix)) {
      this.hide();
      return;
    }
    const found = this.complete(prefix, this.words).slice(0, SHOWN);
    if (!found.length || (found.length === 1 && found[0] === prefix)) {
      this.hide();
      return;
    }
    this.current = found;
    this.list.replaceChildren(...found.map((word) => {
      const li = document.createElement('li');
      li.setAttribute('role', 'option');
      const button = document.createElement('button');
      button.type = 'button';
      button.tabIndex = -1;
      button.dataset.word = word;
      button.textContent = word;
      li.append(button);
      return li;
    }));
    this.list.hidden = false;
  }

  hide() {
    this.current = [];
    this.list.hidden = true;
    this.list.replaceChildren();
  }

  // Tab completes whenever there is a suggestion; Enter only while the word typed is not
  // a whole word yet, so that Enter on a finished code submits it.
  onKey(event) {
    if (!this.current.length) return;
    const word = this.lastWord();
    if (event.key === 'Tab' && !event.shiftKey) {
      event.preventDefault();
      this.accept(this.current[0]);
    } else if (event.key === 'Enter' && !this.wordSet.has(word)) {
      event.preventDefault();
      this.accept(this.current[0]);
    } else if (event.key === 'Escape') {
      this.hide();
    }
  }

  accept(word) {
    const value = this.input.value;
    const start = value.length - (/[^\s-]*$/u.exec(value) || [''])[0].length;
    let next = value.slice(0, start) + word;
    const words = next.split(/[\s-]+/u).filter((part) => part && !/^\d+$/u.test(part));
    if (words.length < WORDS_PER_CODE) next += '-';
    this.input.value = next;
    this.input.focus();
    this.input.setSelectionRange(next.length, next.length);
    this.hide();
  }
}
