'use strict';
// Node.js `ws` fan-out baseline for the fxproxy benchmark.
//
// Same wire protocol as the fxproxy edge (subset):
//   GET /v1/stream?api_key=KEY  (401 before the upgrade on a bad key)
//   {"op":"subscribe","symbols":[...],"id":1} -> {"type":"subscribed","id":1,"symbols":[...]}
//   then one snapshot per symbol (HGET fx:last, with "snapshot":true), then live ticks:
//   the exact bytes published on fx:tick:{SYMBOL}, as text frames.
// One Redis subscriber (PSUBSCRIBE fx:tick:*); for each message the standard ws
// broadcast loop: for (const client of subscribers) client.send(payload).
//
// Usage: node server.js [--port 8082] [--host 127.0.0.1] [--redis-url redis://127.0.0.1:6380/0]
//                       [--key benchkey] [--prefix fx:]
// Environment fallbacks: PORT, BENCH_REDIS_URL, BENCH_KEY.

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer, WebSocket } = require('ws');
const Redis = require('ioredis');

function parseArgs(argv) {
  const opts = {
    host: '127.0.0.1',
    port: Number(process.env.PORT || 8082),
    redisUrl: process.env.BENCH_REDIS_URL || 'redis://127.0.0.1:6380/0',
    key: process.env.BENCH_KEY || 'benchkey',
    prefix: 'fx:',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const name = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`missing value for ${name}`);
    if (name === '--host') opts.host = value;
    else if (name === '--port') opts.port = Number(value);
    else if (name === '--redis-url') opts.redisUrl = value;
    else if (name === '--key') opts.key = value;
    else if (name === '--prefix') opts.prefix = value;
    else throw new Error(`unknown option ${name}`);
  }
  return opts;
}

const opts = parseArgs(process.argv);
const keyDigest = crypto.createHash('sha256').update(opts.key).digest();
const SNAPSHOT_SUFFIX = Buffer.from(',"snapshot":true}');

/** symbol -> Set<WebSocket> */
const subs = new Map();

const redis = new Redis(opts.redisUrl, { lazyConnect: false, maxRetriesPerRequest: 2 });
const sub = new Redis(opts.redisUrl, { lazyConnect: false });

function keyOk(candidate) {
  if (typeof candidate !== 'string') return false;
  const d = crypto.createHash('sha256').update(candidate).digest();
  return crypto.timingSafeEqual(d, keyDigest);
}

function sendJson(ws, obj) {
  ws.send(JSON.stringify(obj));
}

async function subscribe(ws, id, symbols) {
  const added = [];
  for (const sym of symbols) {
    if (ws.symbols.has(sym)) continue;
    ws.symbols.add(sym);
    let set = subs.get(sym);
    if (!set) {
      set = new Set();
      subs.set(sym, set);
    }
    set.add(ws);
    added.push(sym);
  }
  sendJson(ws, { type: 'subscribed', id, symbols });
  if (added.length === 0) return;
  const snaps = await redis.hmgetBuffer(`${opts.prefix}last`, ...added);
  for (const snap of snaps) {
    if (snap && ws.readyState === WebSocket.OPEN) {
      ws.send(Buffer.concat([snap.subarray(0, snap.length - 1), SNAPSHOT_SUFFIX]), { binary: false });
    }
  }
}

function unsubscribe(ws, symbols) {
  for (const sym of symbols) {
    ws.symbols.delete(sym);
    const set = subs.get(sym);
    if (set) {
      set.delete(ws);
      if (set.size === 0) subs.delete(sym);
    }
  }
}

function onMessage(ws, data) {
  let frame;
  try {
    frame = JSON.parse(data.toString());
  } catch (e) {
    sendJson(ws, { type: 'error', id: null, code: 'bad_request', message: 'invalid JSON' });
    return;
  }
  if (frame === null || typeof frame !== 'object') {
    sendJson(ws, { type: 'error', id: null, code: 'bad_request', message: 'expected an object' });
    return;
  }
  const id = frame.id === undefined ? null : frame.id;
  if (frame.op === 'subscribe' || frame.op === 'unsubscribe') {
    const symbols = frame.symbols;
    if (!Array.isArray(symbols) || !symbols.every((s) => typeof s === 'string')) {
      sendJson(ws, { type: 'error', id, code: 'bad_request', message: 'symbols must be a list of strings' });
      return;
    }
    const syms = symbols.map((s) => s.toUpperCase());
    if (frame.op === 'subscribe') {
      subscribe(ws, id, syms).catch((err) => console.error('snapshot failed:', err.message));
    } else {
      unsubscribe(ws, syms);
      sendJson(ws, { type: 'unsubscribed', id, symbols: syms });
    }
  } else if (frame.op === 'ping') {
    sendJson(ws, { type: 'pong', id });
  } else {
    sendJson(ws, { type: 'error', id, code: 'bad_request', message: 'unknown op' });
  }
}

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 64 * 1024 });

wss.on('connection', (ws) => {
  ws.symbols = new Set();
  ws.on('message', (data) => onMessage(ws, data));
  ws.on('close', () => unsubscribe(ws, Array.from(ws.symbols)));
  ws.on('error', () => {});
});

const server = http.createServer((req, res) => {
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found\n');
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname !== '/v1/stream') {
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  if (!keyOk(url.searchParams.get('api_key'))) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});

const cut = `${opts.prefix}tick:`.length;
sub.on('pmessageBuffer', (_pattern, channel, message) => {
  const set = subs.get(channel.toString('latin1', cut));
  if (!set) return;
  // the standard ws broadcast loop
  for (const client of set) {
    if (client.readyState === WebSocket.OPEN) client.send(message, { binary: false });
  }
});

async function main() {
  await sub.psubscribe(`${opts.prefix}tick:*`);
  server.listen({ host: opts.host, port: opts.port, backlog: 1024 }, () => {
    console.error(`node ws server listening on ${opts.host}:${opts.port}`);
  });
}

function shutdown() {
  for (const ws of wss.clients) ws.terminate();
  server.close();
  sub.disconnect();
  redis.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

main().catch((err) => {
  console.error('fatal:', err);
  process.exit(1);
});
