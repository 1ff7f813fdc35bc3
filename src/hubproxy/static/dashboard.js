// hubproxy's routes page. Read-only: it polls GET api/routes and GET dashboard/stats.json with
// the API token, which it keeps in sessionStorage (this tab only, never in a URL), and builds the
// page from text nodes only, so no route data is ever parsed as markup.
"use strict";

(() => {
  const TOKEN_KEY = "hubproxy-dashboard-token";
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);

  let timer = null;
  let previous = null; // the previous stats, for rates
  let routes = {};
  let serverNow = Date.now();

  class Refused extends Error {}

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function getJson(url) {
    const response = await fetch(url, {
      headers: { Authorization: "token " + token() },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 403) throw new Refused("The API refused the token.");
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  function say(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function showLoggedIn(loggedIn) {
    $("login").hidden = loggedIn;
    $("forget").hidden = !loggedIn;
    $("data").hidden = !loggedIn;
    if (!loggedIn) {
      $("data").querySelector("tbody").replaceChildren();
      routes = {};
      previous = null;
    }
  }

  // -- formatting ---------------------------------------------------------------------------

  function ago(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 5) return "just now";
    if (s < 60) return `${s} s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min ago`;
    return `${Math.floor(h / 24)} days ago`;
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function rate(n) {
    return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
  }

  function seconds(s) {
    if (s >= 1) return `${s.toFixed(2)} s`;
    if (s >= 0.001) return `${(s * 1000).toFixed(1)} ms`;
    return `${(s * 1e6).toFixed(0)} µs`;
  }

  const count = (n) => n.toLocaleString("en-US");

  // -- rendering ----------------------------------------------------------------------------

  function cell(text, className, title) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    if (title) td.title = title;
    return td;
  }

  function renderRoutes() {
    const filter = $("filter").value.trim().toLowerCase();
    const rows = [];
    const keys = Object.keys(routes).sort();
    for (const prefix of keys) {
      const data = routes[prefix] || {};
      const extra = Object.entries(data)
        .filter(([k]) => k !== "target" && k !== "last_activity")
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join("  ");
      const target = String(data.target ?? "");
      const haystack = `${prefix} ${target} ${extra}`.toLowerCase();
      if (filter && !haystack.includes(filter)) continue;
      const tr = document.createElement("tr");
      tr.dataset.prefix = prefix;
      tr.append(cell(prefix, "prefix"), cell(target, "target"));
      const when = Date.parse(data.last_activity);
      tr.append(
        Number.isNaN(when)
          ? cell("–", "activity")
          : cell(ago(serverNow - when), "activity", new Date(when).toISOString()),
      );
      tr.append(cell(extra, "extra"));
      rows.push(tr);
    }
    $("routes").querySelector("tbody").replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
    $("route-count").textContent =
      rows.length === keys.length ? `(${keys.length})` : `(${rows.length} of ${keys.length})`;
  }

  function sumValues(obj, predicate) {
    return Object.entries(obj)
      .filter(([k]) => predicate(k))
      .reduce((total, [, v]) => total + v, 0);
  }

  function renderStats(stats) {
    const requests = stats.requests.web + stats.requests.ws;
    const errors = sumValues(stats.requests.proxy, (status) => Number(status) >= 500);
    const clientErrors = sumValues(stats.requests.proxy, (s) => s >= 400 && s < 500);
    const finished = Object.values(stats.durations).reduce((t, d) => t + d.count, 0);
    const busy = Object.values(stats.durations).reduce((t, d) => t + d.seconds, 0);
    const moved = stats.bytes.received + stats.bytes.sent;
    $("s-requests").textContent = `${count(requests)} since start`;
    $("s-error-total").textContent = `${count(errors)} since start; ${count(clientErrors)} 4xx`;
    $("s-clients").textContent = count(stats.connections.clients);
    $("s-websockets").textContent = `${count(stats.connections.websockets)} WebSockets`;
    $("s-upstream").textContent = count(stats.connections.upstream_in_use);
    $("s-upstream-idle").textContent = `in use; ${count(stats.connections.upstream_idle)} idle`;
    $("s-bytes-total").textContent =
      `${bytes(stats.bytes.received)} in, ${bytes(stats.bytes.sent)} out since start`;
    if (previous) {
      const dt = (stats.now - previous.now) / 1000;
      if (dt > 0) {
        $("s-rate").textContent = rate((requests - previous.requests) / dt);
        $("s-errors").textContent = rate((errors - previous.errors) / dt);
        $("s-bytes").textContent = `${bytes((moved - previous.moved) / dt)}/s`;
        const n = finished - previous.finished;
        $("s-latency").textContent = n > 0 ? seconds((busy - previous.busy) / n) : "–";
      }
    }
    previous = { now: stats.now, requests, errors, finished, busy, moved };
    const up = ago(stats.now - stats.started).replace(" ago", "");
    $("version").textContent = `hubproxy ${stats.version}, up ${up}.`;
  }

  // -- polling ------------------------------------------------------------------------------

  async function refresh() {
    if (!token()) return;
    try {
      const [stats, table] = await Promise.all([getJson("dashboard/stats.json"), getJson("api/routes")]);
      serverNow = stats.now;
      routes = table;
      showLoggedIn(true);
      renderStats(stats);
      renderRoutes();
      const time = new Date().toLocaleTimeString();
      say(`${stats.routes} routes; refreshed every ${REFRESH_MS / 1000} s.`);
      $("updated").textContent = `Updated ${time}.`;
    } catch (error) {
      if (error instanceof Refused) {
        forget();
        say(error.message + " Enter the API token again.", true);
      } else {
        say(`Cannot refresh: ${error.message}. Retrying.`, true);
      }
    }
  }

  function start() {
    stop();
    refresh();
    timer = setInterval(() => {
      if (!document.hidden) refresh();
    }, REFRESH_MS);
  }

  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  function forget() {
    stop();
    sessionStorage.removeItem(TOKEN_KEY);
    showLoggedIn(false);
    say("Enter the API token to see the routes.");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const value = input.value.trim();
      input.value = "";
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      say("Loading…");
      start();
    });
    $("forget").addEventListener("click", forget);
    $("filter").addEventListener("input", renderRoutes);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token()) refresh();
    });
    if (token()) start();
    else showLoggedIn(false);
  });
})();
