"""The data plane: the public listener's two legs, and what they share.

- `server`: the client leg (one Protocol per client connection); `upstream`: the upstream leg
  (one Protocol per connection to a target), its life as named phases; `exchange`: the request
  that links them, and the interfaces each leg offers the other;
- `pool`: connections to targets, one pool per origin; `flow`: pausing and resuming reading;
- `headers`, `paths`, `target`, `status`: pure functions over heads, paths and targets;
- `errors`: error pages; `stats`: the numbers; `service`: all of it for one process.

docs/architecture.md draws a request's life through them.
"""

from hubproxy.proxy.service import AccessLog, ProxyService
from hubproxy.proxy.stats import DURATION_BUCKETS, ProxyStats

__all__ = ["DURATION_BUCKETS", "AccessLog", "ProxyService", "ProxyStats"]
