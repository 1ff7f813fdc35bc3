"""--workers N: the data plane in N processes, the store and the API in one.

Theory of operation. With `--workers N` (N > 1) the process started by the user, the
*primary*, keeps everything but the data plane: the route store and its change feed, the REST
API, the metrics and redirect listeners, activity flushing, the pid file and the signals. It
binds the public listener N times with SO_REUSEPORT (a Unix socket listener: once, shared), so
the kernel spreads new connections over N accept queues, and starts N *worker* processes
(`python -m hubproxy.workers.child`), each serving one of those sockets with an ordinary
`ProxyService` and a `RouteTable` of its own. The primary keeps the listening sockets open, so the
connections queued for a worker that dies wait for its replacement instead of being refused.

Each worker is joined to the primary by a socketpair (`channel.Channel`). Primary to worker:

- `("config", Config)` first, then `("reset", seq, [(key, target), ...])`;
- `("set", seq, key, target)` and `("del", seq, key)`: the change feed, in order;
- `("sync", serial)`: answered once everything sent before it is applied. The primary's API
  waits for every worker's answer before it answers a write, so a route the hub has just added
  is served by every worker as soon as the hub hears `201`;
- `("poll", serial, timing)`: answered with the worker's activity marks since the last poll
  and its counters; the primary polls each second (the activity flush), before every API read
  and every metrics scrape.

Worker to primary: `("ready",)` once it serves, `("reply", serial, payload)`, and `("final",
marks, counters, gauges)` after its drain at the stop. SIGTERM and SIGHUP (certificate reload)
are passed on to the workers as signals. A worker that exits unexpectedly is logged and
replaced; its counters are kept, so the metrics' counters never go back.
"""
