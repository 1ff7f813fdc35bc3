"""JupyterHub integration tests: the real `jupyterhub` package in front of hubproxy.

Every test here is marked `integration` (select with `pytest -m integration`, leave out with
`-m "not integration"`); they run in the default `python -m pytest` as well. They need the
`integration` extra (`pip install -e '.[test,integration]'`; `.[test]` alone does not install
JupyterHub) and skip, naming what is missing, without it: each test module first imports
JupyterHub and requests with `pytest.importorskip`, and the hook below marks the tests skipped
when anything else they need is missing. The outage measurements they take are printed at the
end of the run.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = "pip install -e '.[test,integration]'"
_NEEDED = ("jupyterhub", "jupyter_server", "ipykernel", "requests", "websockets")
_MISSING = [name for name in _NEEDED if importlib.util.find_spec(name) is None]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: end-to-end tests with a real JupyterHub (slow, minutes)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(_MISSING)}: {INSTALL}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"jh_report_{report.when}", report)  # for fixtures that show logs on failure


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    jhub = sys.modules.get("jhub")  # imported by the tests that ran, if any
    MEASUREMENTS = getattr(jhub, "MEASUREMENTS", None)
    if MEASUREMENTS:
        terminalreporter.section("JupyterHub integration: measurements")
        for name, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="module")
def jh_workdir() -> Iterator[Path]:
    """A temporary directory for one hub (config, sqlite, homes, logs); removed afterwards.

    Kept (and its path printed) when KEEP_JH_WORKDIR is set, to read the logs.
    """
    import os

    path = Path(tempfile.mkdtemp(prefix="hubproxy-jh-"))
    yield path
    if os.environ.get("KEEP_JH_WORKDIR"):
        print(f"\nkept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)
