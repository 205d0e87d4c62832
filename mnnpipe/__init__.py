"""mnnpipe: compress PyTorch models for MNN as typed, schedulable pipeline steps."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mnnpipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+src"
