// The page's entry point: checks that the browser can run the protocol here at all, then
// routes between the two views by the URL's fragment (#receive, #receive/CODE, #send).
// The fragment never reaches the server, which is why a code may travel in it.

const base = new URL('.', location.href).href;  // the page's folder: the relay may serve it under a prefix
const alert = document.querySelector('[data-role="context-error"]');
const views = {
  receive: document.querySelector('[data-view="receive"]'),
  send: document.querySelector('[data-view="send"]'),
};

function fatal(line) {
  alert.textContent = line;
  alert.hidden = false;
  for (const button of document.querySelectorAll('button, input')) button.disabled = true;
}

function show(name) {
  for (const [key, view] of Object.entries(views)) view.hidden = key !== name;
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (link.dataset.nav === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

// "#receive/417-cobalt-lemon-unicycle" -> ['receive', '417-cobalt-lemon-unicycle'].
function parseFragment() {
  let fragment = location.hash.slice(1);
  try {
    fragment = decodeURIComponent(fragment);
  } catch {
    // a malformed escape: take it as typed
  }
  const slash = fragment.indexOf('/');
  return slash < 0 ? [fragment, ''] : [fragment.slice(0, slash), fragment.slice(slash + 1)];
}

async function main() {
  show(location.hash.startsWith('#send') ? 'send' : 'receive');
  if (!window.isSecureContext || !globalThis.crypto?.subtle) {
    // WebCrypto and service workers exist only in a secure context: say so now rather
    // than fail in the middle of a handshake.
    fatal('This page must be served over https (or from localhost): this browser refuses '
      + 'the cryptography it needs on a plain http address.');
    return;
  }
  let ui;
  try {
    const [codes, receive, send] = await Promise.all([
      import('./lib/codes.js'), import('./ui/receive.js'), import('./ui/send.js'),
    ]);
    const words = codes.loadWords();
    ui = {
      receive: new receive.ReceiveView(views.receive, { base, words, complete: codes.completions }),
      send: new send.SendView(views.send, { base }),
    };
  } catch (error) {
    fatal(`The page could not start: ${String(error && error.message || error).split('\n', 1)[0]}`);
    return;
  }

  const route = () => {
    const [name, code] = parseFragment();
    const view = name === 'send' ? 'send' : 'receive';
    show(view);
    if (view === 'receive' && code) {
      // Out of the address bar and the history once read: the code is a one-time secret.
      history.replaceState(null, '', '#receive');
      ui.receive.start(code);
    } else {
      ui[view].focus();
    }
  };
  window.addEventListener('hashchange', route);
  route();
  // The views now listen: what a person (or a test) does from here on is heard.
  document.documentElement.dataset.page = 'ready';
}

main();
