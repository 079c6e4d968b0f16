"""The old import path of :mod:`omninet.artifacts`, the saved-model format (it moved below the
trial, the sweep and serving, which all read and write it)."""

from omninet.artifacts import *  # noqa: F401,F403
from omninet.artifacts import __all__  # noqa: F401
