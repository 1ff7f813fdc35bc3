"""The REST API (placeholder until the foundation issue's API lands)."""

from __future__ import annotations

from aiohttp import web

from hubproxy.activity import ActivityFlusher
from hubproxy.config import Config
from hubproxy.store.base import RouteStore


def create_api_app(config: Config, store: RouteStore, flusher: ActivityFlusher) -> web.Application:
    return web.Application()
