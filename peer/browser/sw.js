// The service worker that turns a stream of received bytes into a regular download, so a
// file of any size goes to disk without ever sitting whole in the page's memory. The page
// hands over a ReadableStream with a name and a size, then navigates a hidden frame to
// ./download/<id>; this answers that one request with the stream as an attachment. The
// page errors the stream on failure, so the browser fails the download and keeps nothing.

const waiting = new Map();

self.addEventListener('install', (event) => { event.waitUntil(self.skipWaiting()); });
self.addEventListener('activate', (event) => { event.waitUntil(self.clients.claim()); });

self.addEventListener('message', (event) => {
  const { data } = event;
  const port = event.ports[0];
  if (data?.type === 'download' && port && data.stream instanceof ReadableStream && typeof data.id === 'string') {
    waiting.set(data.id, { stream: data.stream, name: String(data.name), size: data.size, port });
    port.postMessage({ type: 'registered' });
  }
  // Any other message (the page's keep-alive during a long download) just keeps us running.
});

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
  const id = decodeURIComponent(url.pathname.slice(prefix.length));
  const item = waiting.get(id);
  waiting.delete(id);  // one request per download: a reload gets nothing
  if (!item) {
    event.respondWith(new Response('This download is over.', { status: 404, headers: { 'Content-Type': 'text/plain' } }));
    return;
  }
  // Tells the page once the browser has taken the last bytes.
  const body = item.stream.pipeThrough(new TransformStream({
    flush() { item.port.postMessage({ type: 'consumed' }); },
  }));
  const headers = {
    'Content-Type': 'application/octet-stream',
    'Content-Disposition': disposition(item.name),
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
  };
  if (Number.isSafeInteger(item.size)) headers['Content-Length'] = String(item.size);
  item.port.postMessage({ type: 'started' });
  event.respondWith(new Response(body, { headers }));
});
