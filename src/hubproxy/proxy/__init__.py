"""The data plane (placeholder)."""

from __future__ import annotations

import asyncio

from hubproxy.config import Config
from hubproxy.routing import RouteTable


class ProxyService:
    def __init__(self, config: Config, table: RouteTable) -> None:
        self.config = config
        self.table = table

    def protocol_factory(self) -> asyncio.Protocol:
        return asyncio.Protocol()

    async def drain(self, seconds: float) -> None:
        return None
