"""Third-party stores (`--storage-backend module:Class`): the worked example of docs/stores.md,
loaded as it is written there, and the one-line errors for values that name no usable store."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hubproxy.routing import RouteTable
from hubproxy.store import MemoryStore, RouteStore, StoreSpecError, load_plugin, open_store
from support import Backend, Proxy, ProxyProcess, http_request

DOCS = Path(__file__).resolve().parent.parent / "docs" / "stores.md"


def example_source() -> str:
    """The Python block of docs/stores.md that defines `jsonfile_store.py`."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    [source] = [b for b in blocks if b.startswith('"""jsonfile_store.py')]
    return source


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "jsonfile_store.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setenv("JSONFILE_STORE_PATH", str(tmp_path / "routes.json"))
    return directory


async def test_the_documented_example_is_a_route_store(plugin_dir: Path, tmp_path: Path) -> None:
    store = open_store("jsonfile_store:JSONFileStore")
    assert isinstance(store, RouteStore) and type(store).__name__ == "JSONFileStore"
    await store.start()
    table = RouteTable()
    store.watch(table)
    when = datetime(2026, 11, 26, 3, 19, 15, 214000, tzinfo=UTC)
    await store.add("/user/a", {"target": "http://a", "last_activity": when})
    await store.add("/user/b", {"target": "http://b"})
    route = table.lookup("/user/a/x")
    assert route is not None and route.target == "http://a"
    await store.record_activity({"/user/b": when, "/gone": when})
    assert await store.remove("/user/a") is True and table.lookup("/user/a") is None
    await store.close()
    again = open_store("jsonfile_store:JSONFileStore")
    await again.start()
    assert await again.get_all() == {"/user/b": {"target": "http://b", "last_activity": when}}
    await again.close()


def test_the_documented_example_runs_the_proxy(
    start_proxy: Callable[..., Proxy], backend: Backend, plugin_dir: Path, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(plugin_dir), "JSONFILE_STORE_PATH": str(tmp_path / "routes.json")}
    proxy = start_proxy("--storage-backend", "jsonfile_store:JSONFileStore", env=env)
    proxy.add_route("/user/alice", backend.url, user="alice")
    before = proxy.routes()
    assert proxy.stop() == 0
    again = start_proxy("--storage-backend", "jsonfile_store:JSONFileStore", env=env)
    assert again.routes() == before
    status, _, _ = http_request(again.host, again.port, "GET", "/user/alice/tree")
    assert status == 200


class NotAStore:
    async def get(self, key: str) -> None:
        return None


class SyncStore(MemoryStore):
    def add(self, key: str, data: dict) -> None:  # type: ignore[override,type-arg]
        pass


class Exploding:
    def __init__(self) -> None:
        raise RuntimeError("REDIS_URI is not set")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule_xyz:Store", "cannot import nosuchmodule_xyz: ModuleNotFoundError"),
        ("hubproxy.store:NoSuchClass", "hubproxy.store has no NoSuchClass"),
        ("hubproxy.store:USAGE", "USAGE is not a class"),
        ("test_store_plugin:NotAStore", "not a RouteStore (needs async start, close, get, "),
        ("test_store_plugin:SyncStore", "wrong or missing: add"),
        ("test_store_plugin:Exploding", "RuntimeError: REDIS_URI is not set"),
        ("configurable-http-proxy-redis-backend", "expected memory, sqlite:///path/routes.db"),
        ("mybackend", "expected memory"),
        ("", "expected memory"),
        ("http://redis:6379", "expected memory"),
    ],
)
def test_values_that_name_no_store(spec: str, message: str) -> None:
    with pytest.raises(StoreSpecError) as info:
        open_store(spec)
    text = str(info.value)
    assert text.startswith(f"--storage-backend {spec}") and "\n" not in text
    assert message in text


def test_a_plugin_class_is_called_once_per_store() -> None:
    store = load_plugin("hubproxy.store.memory:MemoryStore")
    assert isinstance(store, MemoryStore)
    assert load_plugin("hubproxy.store:MemoryStore") is not store


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule_xyz:Store", "cannot import nosuchmodule_xyz"),
        ("mybackend", "expected memory"),
    ],
)
def test_a_bad_value_exits_1_with_one_line(spec: str, message: str) -> None:
    proc = ProxyProcess(["--port", "0", "--api-port", "0", "--storage-backend", spec])
    assert proc.proc.wait(30) == 1
    proc.stop()
    errors = [line for line in proc.lines if " error: " in line]
    assert len(errors) == 1, proc.output()
    assert f"[ConfigProxy] error: --storage-backend {spec}: " in errors[0]
    assert message in errors[0]
    assert not any("Proxying" in line for line in proc.lines)
    assert "Traceback" not in proc.stderr
