// The ticker board: one row per symbol, fed by FxClient (/client.js). No build step.
import { FxClient } from "/client.js";

const $ = (id) => document.getElementById(id);
const SYMBOL_RE = /^[A-Z0-9@._-]{1,32}$/;
const LOG_MAX = 5000;

// Same origin as the page: through nginx or straight to an edge, ws:// or wss://.
const streamUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/stream`;

const board = {
  client: null,
  rows: new Map(), // symbol -> {tr, cells, last, flip, times: []}
  tickTimes: [], // arrival times (ms) of the last second, all symbols
  latencies: [], // [arrival ms, latency ms] of the last second
  log: [], // [symbol, epoch, seq] of every delivered tick, the last LOG_MAX: a witness for tests
  ticks: 0,
  dirty: new Set(),
};
window.fxBoard = board;

function digits(symbol, price) {
  if (symbol.includes("JPY")) return 3;
  if (symbol.startsWith("XAU") || price >= 100) return 2;
  return 5;
}

function parseSymbols(text) {
  return [...new Set(text.toUpperCase().split(/[\s,]+/).filter((s) => SYMBOL_RE.test(s)))];
}

function note(text) {
  $("log").textContent = `${new Date().toLocaleTimeString()} ${text}`;
}

function rowFor(symbol) {
  let row = board.rows.get(symbol);
  if (row) return row;
  const empty = $("rows").querySelector("tr.empty");
  if (empty) empty.remove();
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  const cells = {};
  for (const name of ["symbol", "bid", "ask", "spread", "rate", "seq", "latency"]) {
    const td = document.createElement("td");
    td.className = name;
    td.textContent = name === "symbol" ? symbol : "–";
    tr.append(td);
    cells[name] = td;
  }
  $("rows").append(tr);
  row = { tr, cells, last: null, flip: false, times: [] };
  board.rows.set(symbol, row);
  return row;
}

function flash(td, dir, flip) {
  td.classList.remove("up", "down", "up2", "down2");
  td.classList.add(flip ? `${dir}2` : dir); // alternating names restart the animation without a reflow
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  const run = () => {
    if (!renderPending) return;
    renderPending = false;
    render();
  };
  requestAnimationFrame(run);
  setTimeout(run, 200); // rAF does not run in hidden tabs
}

function render() {
  for (const symbol of board.dirty) {
    const row = board.rows.get(symbol);
    const t = row && row.pending;
    if (!t) continue;
    row.pending = null;
    const d = digits(symbol, t.bid);
    const prev = row.last;
    row.flip = !row.flip;
    for (const side of ["bid", "ask"]) {
      row.cells[side].textContent = t[side].toFixed(d);
      if (prev && t[side] !== prev[side]) flash(row.cells[side], t[side] > prev[side] ? "up" : "down", row.flip);
    }
    row.cells.spread.textContent = ((t.ask - t.bid) * 10 ** (d - 1)).toFixed(1);
    row.cells.seq.textContent = String(t.seq);
    row.cells.latency.textContent = String(Math.max(0, Date.now() - t.ts));
    row.tr.classList.remove("stale");
    row.last = t;
  }
  board.dirty.clear();
}

function trim(now) {
  while (board.tickTimes.length && now - board.tickTimes[0] > 1000) board.tickTimes.shift();
  while (board.latencies.length && now - board.latencies[0][0] > 1000) board.latencies.shift();
  for (const row of board.rows.values()) {
    while (row.times.length && now - row.times[0] > 1000) row.times.shift();
  }
}

function onTick(t) {
  const now = Date.now();
  board.ticks += 1;
  board.tickTimes.push(now);
  board.latencies.push([now, now - t.ts]);
  board.log.push([t.symbol, t.epoch, t.seq]);
  if (board.log.length > LOG_MAX) board.log.splice(0, board.log.length - LOG_MAX);
  const row = rowFor(t.symbol);
  row.times.push(now);
  row.pending = t;
  board.dirty.add(t.symbol);
  scheduleRender();
}

function updateStats() {
  const now = Date.now();
  trim(now);
  $("rate").textContent = String(board.tickTimes.length);
  const lat = board.latencies.map((x) => x[1]).sort((a, b) => a - b);
  $("latency").textContent = lat.length ? String(Math.max(0, lat[lat.length >> 1])) : "–";
  for (const row of board.rows.values()) row.cells.rate.textContent = String(row.times.length);
  const c = board.client;
  if (!c) return;
  for (const [id, value] of [["gaps", c.gaps], ["dups", c.duplicates]]) {
    $(id).textContent = String(value);
    $(id).className = value ? "bad" : "ok";
  }
  $("resets").textContent = String(c.resets);
  $("reconnects").textContent = String(c.reconnects);
  $("outage").textContent = c.lastOutageMs === null ? "–" : String(Math.round(c.lastOutageMs));
}

function showState(d) {
  const el = $("state");
  el.className = `state ${d.state}`;
  el.dataset.state = d.state;
  const extra = d.state === "reconnecting" ? ` in ${Math.round(d.delay)} ms` : "";
  el.textContent = d.state + extra;
  if (d.state === "reconnecting" || d.state === "closed") {
    for (const row of board.rows.values()) row.tr.classList.add("stale");
    if (d.reason) note(`${d.state}: ${d.reason}`);
  }
  if (d.state === "closed") {
    $("go").disabled = false;
    $("stop").disabled = true;
  }
}

function connect(ev) {
  ev.preventDefault();
  const key = $("key").value.trim();
  const symbols = parseSymbols($("symbols").value);
  if (!key || symbols.length === 0) {
    note("a key and at least one symbol, please");
    return;
  }
  if (board.client) {
    if (board.client.key === key && board.client.state !== "closed") {
      board.client.setSymbols(symbols); // resubscribe in place
      dropRows(symbols);
      return;
    }
    board.client.close("replaced");
  }
  const client = new FxClient([streamUrl], key, symbols);
  client.addEventListener("state", (e) => showState(e.detail));
  client.addEventListener("tick", (e) => onTick(e.detail));
  client.addEventListener("subscribed", (e) => {
    const resumed = Object.entries(e.detail.recovered).filter(([, ok]) => ok).length;
    if (resumed) note(`resumed ${resumed} symbol(s) exactly, ${Math.round(client.lastOutageMs ?? 0)} ms after the drop`);
  });
  client.addEventListener("reset", (e) => note(`reset ${e.detail.symbol}: ${e.detail.reason}`));
  client.addEventListener("error", (e) => note(`${e.detail.code}: ${e.detail.message}`));
  client.addEventListener("anomaly", (e) => note(`unannounced ${e.detail.kind} on ${e.detail.symbol}`));
  board.client = client;
  dropRows(symbols);
  for (const s of symbols) rowFor(s);
  $("go").textContent = "Update";
  $("stop").disabled = false;
  client.start();
}

function dropRows(keep) {
  for (const [symbol, row] of board.rows) {
    if (!keep.includes(symbol)) {
      row.tr.remove();
      board.rows.delete(symbol);
    }
  }
}

function disconnect() {
  if (board.client) board.client.close();
  $("go").textContent = "Connect";
}

$("connect").addEventListener("submit", connect);
$("stop").addEventListener("click", disconnect);
setInterval(updateStats, 500);
