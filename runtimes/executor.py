"""The sequential executor's public names, gathered from the modules that hold them.

:class:`Cascade` and its one stage loop live in :mod:`.cascade`, :func:`load` in :mod:`.loader`,
:class:`Prediction` and :class:`StageRecord` in :mod:`.records`, budget planning in :mod:`.budget`.
"""

from .base import stage_io
from .cascade import Cascade
from .latency import profile_name
from .loader import load
from .records import Prediction, StageRecord

__all__ = ["Cascade", "Prediction", "StageRecord", "load", "profile_name", "stage_io"]
