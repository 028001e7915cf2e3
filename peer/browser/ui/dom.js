import { sentence } from './format.js';

// The few DOM chores every view repeats. Elements are found by data-role, the names the
// tests use too, so markup and code agree on one vocabulary.

export function role(root, name) {
  const element = root.querySelector(`[data-role="${name}"]`);
  if (!element) throw new Error(`the page lacks [data-role="${name}"]`);
  return element;
}

export function action(root, name) {
  return [...root.querySelectorAll(`[data-action="${name}"]`)];
}

// Exactly one stage of a view is visible at a time.
export function showStage(view, name) {
  for (const stage of view.querySelectorAll('[data-stage]')) {
    stage.hidden = stage.dataset.stage !== name;
  }
}

// The outcome element carries data-state only while it shows one, so that a test looking
// for [data-state="done"] never finds a stale or hidden one.
export function setResult(element, state, text) {
  element.dataset.state = state;
  element.textContent = sentence(text);
}

export function clearResult(element) {
  delete element.dataset.state;
  element.textContent = '';
}

export function fillList(list, items) {
  list.replaceChildren(...items.map((item) => {
    const li = document.createElement('li');
    if (typeof item === 'string') {
      li.textContent = item;
    } else {
      li.append(item.name);
      if (item.detail) {
        const detail = document.createElement('span');
        detail.className = 'size';
        detail.textContent = ` (${item.detail})`;
        li.append(detail);
      }
    }
    return li;
  }));
  list.hidden = items.length === 0;
}

// Copy to the clipboard; where the browser refuses, select the text so the user can.
export async function copy(text, button, source) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = 'Copied';
  } catch {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = 'Selected';
  }
  setTimeout(() => { button.textContent = label; }, 1500);
}
