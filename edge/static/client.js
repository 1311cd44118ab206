// fxproxy browser client: the same resume rules as the Python client (fxproxy/client.py).
//
//   import { FxClient } from "/client.js";
//   const client = new FxClient(["wss://example.com/v1/stream"], key, ["EURUSD", "GBPUSD"]);
//   client.addEventListener("tick", (e) => console.log(e.detail.symbol, e.detail.bid, e.detail.ask));
//   client.start();
//
// The key goes in the first frame ({"op":"auth","key":...}), never in the URL. On any disconnect
// the client reconnects (the next URL of its list, jittered exponential backoff) and resubscribes
// every symbol with `since` = the last position it saw. Close codes: 1001 at once; 1013 and 4008
// with backoff; 4001, 4003, 1007, 1008, 1009 stop it ("state" event with state "closed").
// A gap or duplicate the server did not announce (`reset`, `recovered:false`, `conflated`) is
// counted and reported as an "anomaly" event: it should never happen. Duplicates are not delivered.
//
// Events (CustomEvent, payload in .detail): state {state, url, delay, reason, code},
// tick {symbol, bid, ask, mid, ts, epoch, seq, snapshot, conflated}, reset {symbol, epoch, reason},
// subscribed {symbols, recovered, pending}, error {code, message, symbols}, anomaly {symbol, kind,
// last, got}. `pending` symbols are not streamed yet: no snapshot, their first tick is on its way
// (a pending resume comes with recovered:false). An error with symbols means the server dropped
// them, streaming until then or not.

export const FATAL_CLOSE = new Map([
  [4001, "unauthorized"],
  [4003, "key revoked or disabled"],
  [1007, "invalid data"],
  [1008, "policy violation"],
  [1009, "message too big"],
]);
const BACK_OFF = new Set([1013, 4008]);
const CHUNK = 100; // symbols per subscribe frame (FXPROXY_MAX_SYMBOLS_PER_REQUEST)

/** Last position per symbol and whether the next tick may jump (announced); no I/O. */
export class Positions {
  constructor() {
    this.last = new Map(); // symbol -> [epoch, seq]
    this.announced = new Set();
    this.gaps = 0;
    this.duplicates = 0;
  }

  since(symbols) {
    const out = {};
    for (const s of symbols) {
      const p = this.last.get(s);
      if (p) out[s] = { epoch: p[0], seq: p[1] };
    }
    return out;
  }

  announce(symbol) {
    this.announced.add(symbol);
  }

  /** Judge a tick: {deliver, anomaly}. */
  tick(symbol, epoch, seq, conflated) {
    const last = this.last.get(symbol);
    if (last === undefined || this.announced.has(symbol)) {
      this.announced.delete(symbol);
      this.last.set(symbol, [epoch, seq]);
      return { deliver: true, anomaly: null };
    }
    let anomaly = null;
    if (epoch !== last[0]) {
      anomaly = { symbol, kind: "epoch", last, got: [epoch, seq] };
      this.gaps += 1;
    } else if (seq <= last[1]) {
      this.duplicates += 1;
      return { deliver: false, anomaly: { symbol, kind: "duplicate", last, got: [epoch, seq] } };
    } else if (seq !== last[1] + 1 && !conflated) {
      anomaly = { symbol, kind: "gap", last, got: [epoch, seq] };
      this.gaps += 1;
    }
    this.last.set(symbol, [epoch, seq]);
    return { deliver: true, anomaly };
  }
}

export class FxClient extends EventTarget {
  /**
   * @param {string|string[]} urls WebSocket URLs of edges or of nginx, tried in turn
   * @param {string} key API key, sent in the auth frame
   * @param {string[]} symbols
   */
  constructor(urls, key, symbols, { backoffInitial = 100, backoffMax = 10000, openTimeout = 5000 } = {}) {
    super();
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    if (this.urls.length === 0) throw new Error("no URL");
    this.key = key;
    this.symbols = [...new Set(symbols)];
    this.backoffInitial = backoffInitial;
    this.backoffMax = backoffMax;
    this.openTimeout = openTimeout;
    this.positions = new Positions();
    this.state = "idle";
    this.reconnects = 0;
    this.resets = 0;
    this.lastOutageMs = null; // from losing a connection to the next `subscribed`
    this._attempt = 0;
    this._index = 0;
    this._ws = null;
    this._timer = null;
    this._lostAt = null;
    this._stopped = false;
  }

  get gaps() {
    return this.positions.gaps;
  }

  get duplicates() {
    return this.positions.duplicates;
  }

  start() {
    this._stopped = false;
    if (!this._ws && this._timer === null) this._connect();
  }

  /** Stop for good (no reconnect). */
  close(reason = "closed by the page") {
    this._stopped = true;
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "bye");
    this._setState("closed", { reason });
  }

  /** Change the symbol set; applied at once when connected, else on the next connect. */
  setSymbols(symbols) {
    const next = [...new Set(symbols)];
    const added = next.filter((s) => !this.symbols.includes(s));
    const removed = this.symbols.filter((s) => !next.includes(s));
    this.symbols = next;
    if (this.state !== "connected") return;
    if (removed.length) this._send({ op: "unsubscribe", symbols: removed });
    this._subscribe(added);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, url: this._url || "", delay: 0, reason: "", code: 0, ...extra });
  }

  _delay() {
    const base = Math.min(this.backoffMax, this.backoffInitial * 2 ** this._attempt);
    return base * (0.5 + Math.random() * 0.5);
  }

  _send(obj) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(obj));
  }

  _subscribe(symbols) {
    for (let i = 0; i < symbols.length; i += CHUNK) {
      const chunk = symbols.slice(i, i + CHUNK);
      const cmd = { op: "subscribe", symbols: chunk };
      const since = this.positions.since(chunk);
      if (Object.keys(since).length) cmd.since = since;
      this._send(cmd);
    }
  }

  _connect() {
    this._timer = null;
    if (this._stopped) return;
    const url = this.urls[this._index % this.urls.length];
    this._url = url;
    this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      this._lost(0, String(err));
      return;
    }
    this._ws = ws;
    let authenticated = false;
    const guard = setTimeout(() => {
      if (this._ws === ws && !authenticated) ws.close(4000, "open timeout"); // reconnects via onclose
    }, this.openTimeout);
    ws.onopen = () => {
      ws.send(JSON.stringify({ op: "auth", key: this.key }));
    };
    ws.onmessage = (msg) => {
      if (this._ws !== ws) return;
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (!authenticated) {
        if (data && data.type === "authenticated") {
          authenticated = true;
          clearTimeout(guard);
          this._setState("connected", { key: data.key });
          this._subscribe(this.symbols);
        }
        return;
      }
      this._handle(data);
    };
    ws.onclose = (ev) => {
      clearTimeout(guard);
      if (this._ws !== ws) return; // replaced or closed by us
      this._ws = null;
      this._lost(ev.code, ev.reason);
    };
  }

  _lost(code, reason) {
    if (this._stopped) return;
    const why = `closed ${code}${reason ? " " + reason : ""}`;
    if (FATAL_CLOSE.has(code)) {
      this._stopped = true;
      this._setState("closed", { code, reason: `${FATAL_CLOSE.get(code)} (${why})` });
      return;
    }
    if (this._lostAt === null) this._lostAt = performance.now();
    const atOnce = code === 1001;
    if (BACK_OFF.has(code)) this._attempt = Math.max(this._attempt, 3);
    const delay = atOnce ? 0 : this._delay();
    if (!atOnce) this._attempt += 1;
    this._index += 1;
    this.reconnects += 1;
    this._setState("reconnecting", { code, delay, reason: why });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _handle(msg) {
    if (!msg || typeof msg !== "object") return;
    const kind = msg.type;
    if (kind === "tick") {
      this._attempt = 0; // a good session resets the backoff
      const { deliver, anomaly } = this.positions.tick(msg.symbol, msg.epoch, msg.seq, !!msg.conflated);
      if (anomaly) this._emit("anomaly", anomaly);
      if (deliver) this._emit("tick", msg);
    } else if (kind === "reset") {
      this.resets += 1;
      this.positions.announce(msg.symbol);
      this._emit("reset", { symbol: msg.symbol, epoch: msg.epoch, reason: msg.reason || "" });
    } else if (kind === "subscribed") {
      this._attempt = 0;
      const recovered = msg.recovered || {};
      if (this._lostAt !== null) {
        this.lastOutageMs = performance.now() - this._lostAt;
        this._lostAt = null;
      }
      this._emit("subscribed", { symbols: msg.symbols || [], recovered, pending: msg.pending || [] });
      for (const [symbol, ok] of Object.entries(recovered)) {
        if (!ok) {
          this.resets += 1;
          this.positions.announce(symbol);
          this._emit("reset", { symbol, epoch: null, reason: "not recovered" });
        }
      }
    } else if (kind === "error" || kind === "unsubscribed") {
      const symbols = msg.symbols || [];
      if (kind === "unsubscribed" || msg.code === "forbidden_symbol" || msg.code === "unknown_symbol") {
        this.symbols = this.symbols.filter((s) => !symbols.includes(s)); // not asked for again
      }
      if (kind === "error" || msg.reason) {
        this._emit("error", {
          code: kind === "error" ? String(msg.code) : "unsubscribed",
          message: String(msg.message || msg.reason || ""),
          symbols,
        });
      }
    }
  }
}
