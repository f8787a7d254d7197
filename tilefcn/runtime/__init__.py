"""The worker-side runtime: devices and transfers (:mod:`.device`), input scaling
(:mod:`.scaling`), backends and their measured choice (:mod:`.backends`, :mod:`.select`),
the batching, staged engine (:mod:`.engine`), the per-process cache (:mod:`.cache`) and the
dask worker plugin (:mod:`.plugin`, imported on demand: it needs ``distributed``).
"""

from tilefcn.runtime.backends import CHOICES as BACKENDS
from tilefcn.runtime.cache import ModelRef, get_engine, make_ref, run_tile
from tilefcn.runtime.device import PRECISIONS, resolve_device
from tilefcn.runtime.engine import DEFAULT_BATCH, DEFAULT_SUB_TILE, Engine, stream_tiles
from tilefcn.runtime.scaling import scale_input

__all__ = ["BACKENDS", "DEFAULT_BATCH", "DEFAULT_SUB_TILE", "PRECISIONS", "Engine", "ModelRef",
           "get_engine", "make_ref", "resolve_device", "run_tile", "scale_input",
           "stream_tiles"]
