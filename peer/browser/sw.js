// The service worker that turns received bytes into a regular download, so a file of any
// size goes to disk without ever sitting whole in the page's memory. The page registers a
// download (a name, a size, a MessagePort), then navigates a hidden frame to
// ./download/<id>; this answers that one request with a stream fed through the port.
//
// The port protocol, page → here: {type: 'chunk', bytes} (the buffer transferred, not
// copied: the page no longer uses it), {type: 'close'}, {type: 'abort', reason}.
// Here → page: {type: 'registered', protocol}, 'started', {type: 'taken', size, back?} as
// the browser reads each chunk (the page keeps a bounded number of bytes untaken:
// backpressure down to the disk; `back` is an older chunk the browser is done with, for the
// page to drop), 'consumed' once it has read everything, 'cancelled' if the browser stops
// reading.
// An aborted download is errored, so the browser fails it and keeps nothing; so is one whose
// page is gone (closed, crashed: no longer among our clients) or went quiet (frozen, or in
// the back-forward cache: no chunk and no keep-alive for QUIET_LIMIT).

const PROTOCOL = 2;  // saving.js's WORKER_PROTOCOL: the page registers us as sw.js?protocol=2
const QUIET_LIMIT = 60_000;
const CHECK_EVERY = 2_000;
const END = Symbol('end');
const RETURN_LAG = 2;  // chunks handed to the browser that we keep before giving them back
// Only where we know how the browser reads a response stream, and test it: Chromium (the
// one engine with navigator.userAgentData). Elsewhere chunks simply die here.
const GIVE_BACK = typeof self.navigator?.userAgentData === 'object' && self.navigator.userAgentData !== null;

const downloads = new Map();  // id → Download, from registration until it ends

class Download {
  constructor(id, name, size, port, client) {
    this.id = id;
    this.client = client;   // the page's id among our clients
    this.name = name;
    this.size = size;
    this.port = port;
    this.requested = false;
    this.queue = [];
    this.delivered = [];    // the last chunks handed to the browser, newest last
    this.waiting = null;    // resolves a pull that found the queue empty
    this.ended = false;
    this.heard = Date.now();
    this.stream = new ReadableStream({
      start: (controller) => { this.controller = controller; },
      pull: () => this.pull(),
      cancel: () => this.end({ type: 'cancelled' }),
    }, { highWaterMark: 0 });  // the browser's reads pull chunks one by one: `taken` means read
    port.onmessage = ({ data }) => this.onMessage(data);
  }

  onMessage(data) {
    this.heard = Date.now();
    if (this.ended) return;
    if (data?.type === 'chunk' && data.bytes instanceof Uint8Array) this.push(data.bytes);
    else if (data?.type === 'close') this.push(END);
    else if (data?.type === 'abort') this.fail(String(data.reason || 'the transfer failed'));
  }

  push(item) {
    this.queue.push(item);
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      this.deliver();
      resolve();
    }
  }

  pull() {
    if (this.queue.length) {
      this.deliver();
      return undefined;
    }
    return new Promise((resolve) => { this.waiting = resolve; });
  }

  deliver() {
    const item = this.queue.shift();
    if (item === END) {
      this.controller.close();
      this.end({ type: 'consumed' });
      return;
    }
    const size = item.length;
    this.controller.enqueue(item);
    // Chunks the browser has finished with go back to the page, transferred: the buffers
    // then die in the page's heap rather than in ours, and with one heap holding the
    // garbage instead of two, the renderer peaks ~80 MiB lower for a 1 GiB download. The
    // browser asks for a chunk (this pull) only once it has copied all of the previous one
    // out (Chromium's stream consumer keeps one chunk pending at a time); we give back the
    // one before that, a chunk of margin. The tests and the bench check every byte.
    if (GIVE_BACK) this.delivered.push(item);
    const back = this.delivered.length > RETURN_LAG ? this.delivered.shift() : null;
    if (back) this.port.postMessage({ type: 'taken', size, back }, [back.buffer]);
    else this.port.postMessage({ type: 'taken', size });
  }

  fail(reason) {
    if (this.ended) return;
    this.controller.error(new Error(reason));
    this.end({ type: 'cancelled' });
  }

  end(message) {
    if (this.ended) return;
    this.ended = true;
    this.queue = [];
    this.delivered = [];
    downloads.delete(this.id);
    try {
      this.port.postMessage(message);
    } catch {
      // the page is gone
    }
  }
}

self.addEventListener('install', (event) => { event.waitUntil(self.skipWaiting()); });
self.addEventListener('activate', (event) => { event.waitUntil(self.clients.claim()); });

self.addEventListener('message', (event) => {
  const { data } = event;
  const port = event.ports[0];
  if (data?.type === 'download' && port && typeof data.id === 'string' && !downloads.has(data.id)) {
    const size = Number.isSafeInteger(data.size) && data.size >= 0 ? data.size : null;
    downloads.set(data.id, new Download(data.id, String(data.name), size, port, event.source?.id ?? null));
    port.postMessage({ type: 'registered', protocol: PROTOCOL });
  } else if (data?.type === 'keep-alive') {
    // It keeps us running (a message event extends our life) and says the page is there.
    const download = downloads.get(data.id);
    if (download) download.heard = Date.now();
  }
});

setInterval(async () => {
  const now = Date.now();
  for (const download of [...downloads.values()]) {
    const gone = download.client !== null && !(await self.clients.get(download.client));
    if (gone || now - download.heard > QUIET_LIMIT) download.fail('the page went away');
  }
}, CHECK_EVERY);

// RFC 6266 / 8187: the UTF-8 name for browsers, a plain ASCII one for anything older.
function disposition(name) {
  const ascii = name.replace(/[^\x20-\x7e]|["\\%]/g, '_');
  const encoded = encodeURIComponent(name).replace(/['()*!]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encoded}`;
}

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  const prefix = `${new URL(self.registration.scope).pathname}download/`;
  if (url.origin !== self.location.origin || !url.pathname.startsWith(prefix)) return;
  const download = downloads.get(decodeURIComponent(url.pathname.slice(prefix.length)));
  if (!download || download.requested) {  // one request per download: a reload gets nothing
    event.respondWith(new Response('This download is over.', { status: 404, headers: { 'Content-Type': 'text/plain' } }));
    return;
  }
  download.requested = true;
  const headers = {
    'Content-Type': 'application/octet-stream',
    'Content-Disposition': disposition(download.name),
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
  };
  if (download.size !== null) headers['Content-Length'] = String(download.size);
  download.port.postMessage({ type: 'started' });
  event.respondWith(new Response(download.stream, { headers }));
});
