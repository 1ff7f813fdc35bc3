"""hubproxy: a fast, pure-Python drop-in replacement for configurable-http-proxy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hubproxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
