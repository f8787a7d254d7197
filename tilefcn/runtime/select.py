"""``--backend auto``: measure the installed backends on sub-tiles of this model, keep those
within 1e-5 of eager torch, use the fastest (with the sub-tile edge, when several are
measured: :func:`tilefcn.runtime.cache._build`). The choice is cached per model, machine and
sub-tile shape (in this process and in ``$TILEFCN_CACHE_DIR/backends.json``).

``torch.compile`` is not among the candidates: compiling the bundled `tissue` model took 57 s
(and 18 s more per new window shape) on a 2-core host, far beyond a few seconds at start, for
1.25× over channels_last eager. Ask for it with ``--backend compile``.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tilefcn.modelio import Scaling
from tilefcn.runtime.backends import build_runner, installed
from tilefcn.runtime.scaling import scale_batch

AUTO_CANDIDATES = ("torch", "torch-cl", "onnxruntime")
ATOL = 1e-5
#: Seconds each candidate is timed for (after a warm-up call).
MEASURE_SECONDS = 0.6
_MEMO: dict[str, dict] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """The backend used and what was measured (MP/s per candidate; errors vs eager torch)."""

    backend: str
    rates: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    cached: bool = False
    rejected: dict = field(default_factory=dict)  # backend → why it was not used
    sub_tile: int | None = None  # the sub-tile edge chosen with the backend
    by_sub_tile: dict = field(default_factory=dict)  # edge → {backend: MP/s}
    peak_mb: float | None = None  # peak memory growth while measuring (see choose_backend)
    too_large: dict = field(default_factory=dict)  # edge → why it was not measured / used

    def to_dict(self) -> dict:
        out = {"backend": self.backend, "rates_mp_per_s": self.rates,
               "max_error_vs_torch": self.errors}
        if self.sub_tile is not None:
            out["sub_tile"] = self.sub_tile
        if len(self.by_sub_tile) > 1 or self.too_large:
            out["rates_by_sub_tile"] = {str(k): v for k, v in self.by_sub_tile.items()}
        if self.too_large:
            out["sub_tiles_left_out"] = {str(k): v for k, v in self.too_large.items()}
        return {**out, "rejected": self.rejected} if self.rejected else out


def _cache_file() -> Path:
    root = os.environ.get("TILEFCN_CACHE_DIR") or Path.home() / ".cache" / "tilefcn"
    return Path(root) / "backends.json"


def machine_id() -> str:
    """What a measured choice is valid for: CPU, cores, torch and ONNX Runtime versions."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "none"
    return "|".join([platform.machine(), platform.processor() or _cpu_model(),
                     str(os.cpu_count()), torch.__version__, ort])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _load_disk() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_disk(key: str, value: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice is still memoised in this process


def rss_mb() -> float:
    """This process's resident memory now, MB (``/proc/self/statm``; where there is no
    ``/proc``, the peak so far from ``getrusage``, 0 where neither is available)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return 0.0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PeakRss:
    """``with PeakRss() as peak:`` — ``peak.mb``, the largest :func:`rss_mb` while open,
    sampled every ``interval`` s by a thread. Unlike ``getrusage``'s peak it sees the
    growth of a process that peaked higher earlier (a long-lived worker)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True,
                                        name="tilefcn-rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.mb = max(self.mb, rss_mb())

    def __enter__(self) -> PeakRss:
        self.mb = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, rss_mb())


def _rate(call, pixels: int, budget: float) -> float:
    """MP/s of ``call()`` producing ``pixels`` input pixels' outputs, after one warm-up."""
    call()  # warm up (allocations, ONNX Runtime's first-run optimisation)
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget or calls >= 50:
            return calls * pixels / 1e6 / elapsed


def choose_backend(key: str, module: nn.Module, *, in_channels: int,
                   window: tuple[int, int], out_pixels: int, budget: float | None = None,
                   runners: dict | None = None, baseline_mb: float | None = None,
                   scaling: Scaling | None = None) -> Choice:
    """Measure ``AUTO_CANDIDATES`` on a random ``window``-sized input (``out_pixels`` input
    pixels are produced per call) and return the fastest one within :data:`ATOL` of eager
    NCHW torch. Each timed call starts from raw uint8 pixels scaled as the CPU engine does
    (:func:`~tilefcn.runtime.scaling.scale_batch` with ``scaling``, in the backend's
    layout): the scaling's cost grows with the window past the caches, so it counts.
    ``key`` identifies the model (fingerprint/sha256). ``runners`` (backend → runner, one
    torch thread): runners built by an earlier call, reused (every backend takes
    any window size, so one ONNX export serves every sub-tile edge); new ones are added.
    ``baseline_mb``: :func:`rss_mb` before the first measurement; the growth of the peak
    sampled while this one measures (:class:`PeakRss`) over it is returned (and cached) as
    ``peak_mb``: what one thread running this window size needs, measured edges being
    ascending."""
    runners = {} if runners is None else runners
    cache_key = f"{key}|{machine_id()}|raw|{window[0]}x{window[1]}"  # timed from raw pixels
    with _LOCK:
        hit = _MEMO.get(cache_key) or _load_disk().get(cache_key)
        if hit and hit.get("backend") in AUTO_CANDIDATES and installed(hit["backend"]):
            _MEMO[cache_key] = hit
            return Choice(hit["backend"], hit.get("rates", {}), hit.get("errors", {}), True,
                          peak_mb=hit.get("peak_mb"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # measured as tasks run them: one torch thread per task
        peak = PeakRss()
        try:
            peak.__enter__()
            gen = torch.Generator().manual_seed(0)
            x = torch.rand(1, in_channels, *window, generator=gen)
            raw = np.random.default_rng(0).integers(0, 256, (1, *window, in_channels),
                                                    dtype=np.uint8)
            reference = build_runner("torch", module, torch.device("cpu"),
                                     in_channels=in_channels, example=window[0])(x).float()
            scale = max(1.0, float(reference.abs().max()))
            rates, errors = {}, {}
            for name in AUTO_CANDIDATES:
                if not installed(name):
                    continue
                try:
                    runner = runners.get(name) or build_runner(
                        name, module, torch.device("cpu"), in_channels=in_channels,
                        example=window[0])
                    runners[name] = runner
                    out = runner(x).float()
                except Exception:  # noqa: BLE001,S112 - a backend that cannot run is no candidate
                    continue
                if out.shape != reference.shape:
                    continue
                errors[name] = float((out - reference).abs().max())
                if errors[name] <= ATOL * scale:
                    layout = getattr(runner, "channels_last", False)

                    def call(runner=runner, layout=layout) -> None:
                        runner(torch.from_numpy(scale_batch(raw, scaling or Scaling(),
                                                            channels_last=layout)))

                    rates[name] = round(_rate(call, out_pixels, budget or MEASURE_SECONDS), 2)
        finally:
            peak.__exit__()
            torch.set_num_threads(threads)
        best = max(rates, key=rates.get) if rates else "torch-cl"
        growth = None if baseline_mb is None else round(max(0.0, peak.mb - baseline_mb), 1)
        value = {"backend": best, "rates": rates, "errors": errors, "peak_mb": growth}
        _MEMO[cache_key] = value
        _save_disk(cache_key, value)
        return Choice(best, rates, errors, peak_mb=growth)
