"""Side-by-side benchmark of hubproxy against Node configurable-http-proxy (CHP).

Run ``python -m bench --help``. The proxy under test runs alone on core 0; the backend, wrk and
this process's own clients (WebSocket, API) share core 1. Every figure is judged twice: the
throughput the client saw, and the proxy's own CPU time per unit of work read from /proc, which a
saturated load generator cannot hide.
"""
