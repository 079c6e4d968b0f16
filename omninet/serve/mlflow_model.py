"""The old import path of :mod:`omninet.mlflow_model` (the sweep's MLflow writer logs trial models
with it, so it sits below the sweep). Models logged before the move load through this name: their
copied entry file imports ``OmniNetPyfunc`` from here."""

from omninet.mlflow_model import *  # noqa: F401,F403
from omninet.mlflow_model import __all__  # noqa: F401
