// A streaming ZIP writer, so that several received files (or a tree) arrive as one download
// without ever being held in memory: entries are stored (method 0, the files are as they
// came), each file's sizes and CRC-32 follow its bytes in a data descriptor (flag bit 3),
// names are UTF-8 (flag bit 11), and ZIP64 records appear whenever a size, an offset or
// the entry count needs them, so archives past 4 GiB work.

const SIGNATURE = {
  LOCAL: 0x04034b50, DESCRIPTOR: 0x08074b50, CENTRAL: 0x02014b50,
  END64: 0x06064b50, LOCATOR64: 0x07064b50, END: 0x06054b50,
};
const UTF8_NAMES = 0x0800;
const DESCRIPTOR_FOLLOWS = 0x0008;
const MADE_BY_UNIX = 3 << 8;
const MAX32 = 0xffffffff;
const MAX16 = 0xffff;

// --- CRC-32 (IEEE), eight table lookups per 8 bytes ----------------------------------------

const TABLES = (() => {
  const t = new Int32Array(256 * 8);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  for (let n = 0; n < 256; n++) {
    for (let k = 1; k < 8; k++) t[k * 256 + n] = (t[(k - 1) * 256 + n] >>> 8) ^ t[t[(k - 1) * 256 + n] & 0xff];
  }
  return t;
})();

/** CRC-32 of `bytes` continuing from `crc` (0 to start). */
export function crc32(bytes, crc = 0) {
  const t = TABLES;
  let c = ~crc;
  let i = 0;
  const end8 = bytes.length - (bytes.length % 8);
  for (; i < end8; i += 8) {
    const a = c ^ (bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24));
    c = t[1792 + (a & 0xff)] ^ t[1536 + ((a >>> 8) & 0xff)] ^ t[1280 + ((a >>> 16) & 0xff)] ^ t[1024 + (a >>> 24)]
      ^ t[768 + bytes[i + 4]] ^ t[512 + bytes[i + 5]] ^ t[256 + bytes[i + 6]] ^ t[bytes[i + 7]];
  }
  for (; i < bytes.length; i++) c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

// --- little-endian records -------------------------------------------------------------

class Record {
  constructor(size) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
    this.at = 0;
  }

  u16(value) { this.view.setUint16(this.at, value, true); this.at += 2; return this; }

  u32(value) { this.view.setUint32(this.at, value, true); this.at += 4; return this; }

  u64(value) { this.view.setBigUint64(this.at, BigInt(value), true); this.at += 8; return this; }

  raw(bytes) { this.bytes.set(bytes, this.at); this.at += bytes.length; return this; }
}

function dosTime(date) {
  const time = (date.getHours() << 11) | (date.getMinutes() << 5) | (date.getSeconds() >> 1);
  const day = (Math.max(0, date.getFullYear() - 1980) << 9) | ((date.getMonth() + 1) << 5) | date.getDate();
  return [time, day];
}

const encoder = new TextEncoder();

/**
 * Writes a ZIP archive to `write(bytes)` (async, awaited: its backpressure is ours) as
 * entries come: `directory(path)`, or `beginFile(path, size)` (size null when unknown),
 * `write(bytes)`..., `endFile()`; then `finish()`. `zip64Threshold` lowers the point past
 * which ZIP64 records are used (tests force them on small archives with it).
 */
export class ZipWriter {
  constructor(write, { zip64Threshold = MAX32, date = new Date() } = {}) {
    this.sink = write;
    this.threshold = Math.min(zip64Threshold, MAX32);
    [this.time, this.day] = dosTime(date);
    this.offset = 0;
    this.entries = [];
    this.current = null;
    this.finished = false;
  }

  async emit(bytes) {
    this.offset += bytes.length;
    await this.sink(bytes);
  }

  startEntry(path, directory) {
    if (this.current || this.finished) throw new Error('the previous zip entry is still open');
    const name = encoder.encode(directory ? `${path}/` : path);
    if (name.length > MAX16) throw new Error(`${path}: the name is too long for a zip archive`);
    return { name, directory, offset: this.offset, crc: 0, size: 0, zip64: false };
  }

  localHeader(entry, flags) {
    // A streamed entry that may reach the threshold carries a ZIP64 extra field, so that
    // its data descriptor may hold 8-byte sizes (APPNOTE 4.3.9.2).
    const extra = entry.zip64 ? 20 : 0;
    const record = new Record(30 + entry.name.length + extra)
      .u32(SIGNATURE.LOCAL).u16(entry.zip64 ? 45 : 20).u16(flags).u16(0).u16(this.time).u16(this.day)
      .u32(0).u32(entry.zip64 ? MAX32 : 0).u32(entry.zip64 ? MAX32 : 0).u16(entry.name.length).u16(extra)
      .raw(entry.name);
    if (entry.zip64) record.u16(0x0001).u16(16).u64(0).u64(0);
    return record.bytes;
  }

  /** An empty directory (or any directory): a name ending in `/`, no data. */
  async directory(path) {
    const entry = this.startEntry(path, true);
    this.entries.push(entry);
    await this.emit(this.localHeader(entry, UTF8_NAMES));
  }

  /** Starts a file of `size` bytes (null: unknown); its bytes follow through `write`. */
  async beginFile(path, size = null) {
    const entry = this.startEntry(path, false);
    entry.zip64 = size === null || size >= this.threshold;
    this.current = entry;
    this.entries.push(entry);
    await this.emit(this.localHeader(entry, UTF8_NAMES | DESCRIPTOR_FOLLOWS));
  }

  async write(bytes) {
    const entry = this.current;
    if (!entry) throw new Error('no zip entry is open');
    entry.crc = crc32(bytes, entry.crc);
    entry.size += bytes.length;
    if (!entry.zip64 && entry.size >= this.threshold) throw new Error(`${new TextDecoder().decode(entry.name)} grew past its size`);
    await this.emit(bytes);
  }

  async endFile() {
    const entry = this.current;
    if (!entry) throw new Error('no zip entry is open');
    this.current = null;
    const record = new Record(entry.zip64 ? 24 : 16).u32(SIGNATURE.DESCRIPTOR).u32(entry.crc);
    if (entry.zip64) record.u64(entry.size).u64(entry.size);
    else record.u32(entry.size).u32(entry.size);
    await this.emit(record.bytes);
  }

  centralHeader(entry) {
    const bigSize = entry.zip64 || entry.size >= this.threshold;
    const bigOffset = entry.offset >= this.threshold;
    // The ZIP64 extra holds exactly the fields that are 0xffffffff, in this order.
    const fields = [...(bigSize ? [entry.size, entry.size] : []), ...(bigOffset ? [entry.offset] : [])];
    const extra = fields.length ? 4 + 8 * fields.length : 0;
    const flags = UTF8_NAMES | (entry.directory ? 0 : DESCRIPTOR_FOLLOWS);
    const version = extra || entry.zip64 ? 45 : 20;
    const mode = entry.directory ? ((0o40755 << 16) | 0x10) : (0o100644 << 16);
    const record = new Record(46 + entry.name.length + extra)
      .u32(SIGNATURE.CENTRAL).u16(MADE_BY_UNIX | version).u16(version).u16(flags).u16(0)
      .u16(this.time).u16(this.day).u32(entry.crc)
      .u32(bigSize ? MAX32 : entry.size).u32(bigSize ? MAX32 : entry.size)
      .u16(entry.name.length).u16(extra).u16(0).u16(0).u16(0).u32(mode >>> 0)
      .u32(bigOffset ? MAX32 : entry.offset)
      .raw(entry.name);
    if (extra) {
      record.u16(0x0001).u16(extra - 4);
      for (const value of fields) record.u64(value);
    }
    return record.bytes;
  }

  /** The central directory and the end records; the archive is then complete. */
  async finish() {
    if (this.current) throw new Error('a zip entry is still open');
    this.finished = true;
    const start = this.offset;
    // Batched: many small records cost one write each otherwise.
    let batch = [];
    let batched = 0;
    for (const entry of this.entries) {
      const header = this.centralHeader(entry);
      batch.push(header);
      batched += header.length;
      if (batched >= 1 << 20) {
        await this.emit(concat(batch, batched));
        batch = [];
        batched = 0;
      }
    }
    if (batch.length) await this.emit(concat(batch, batched));
    const size = this.offset - start;
    const count = this.entries.length;
    const zip64 = count >= MAX16 || size >= this.threshold || start >= this.threshold;
    const tail = [];
    if (zip64) {
      const end64 = this.offset;
      tail.push(new Record(56).u32(SIGNATURE.END64).u64(44).u16(MADE_BY_UNIX | 45).u16(45).u32(0).u32(0)
        .u64(count).u64(count).u64(size).u64(start).bytes);
      tail.push(new Record(20).u32(SIGNATURE.LOCATOR64).u32(0).u64(end64).u32(1).bytes);
    }
    const many = count >= MAX16 || zip64;
    tail.push(new Record(22).u32(SIGNATURE.END).u16(0).u16(0)
      .u16(many ? MAX16 : count).u16(many ? MAX16 : count)
      .u32(zip64 && size >= this.threshold ? MAX32 : size)
      .u32(zip64 ? MAX32 : start).u16(0).bytes);
    await this.emit(concat(tail, tail.reduce((sum, part) => sum + part.length, 0)));
  }
}

function concat(parts, size) {
  const out = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}
