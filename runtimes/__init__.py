"""Device-side runtime: backend adapters and the sequential executor.

Importing this package loads numpy and stagewise's own modules only; a backend is imported
when a bundle is loaded on it.
"""

from .base import RUNTIMES, LoadOptions, Runtime, StageIO, StageSession, register_runtime, resolve_runtime
from .executor import Cascade, Prediction, StageRecord, load, profile_name, stage_io
from .options import LiteRTOptions, OnnxRuntimeOptions, OpenVinoOptions, RuntimeOptions
from .routing import StageRouter

__all__ = ["RUNTIMES", "Cascade", "LiteRTOptions", "LoadOptions", "OnnxRuntimeOptions", "OpenVinoOptions", "Prediction",
           "Runtime", "RuntimeOptions", "StageIO", "StageRecord", "StageRouter", "StageSession", "load", "profile_name", "stage_io",
           "register_runtime", "resolve_runtime"]
