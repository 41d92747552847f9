"""kronosd: the service, its configuration and the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kronosd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
