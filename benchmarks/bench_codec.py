"""Zarr v3 compressors on realistic heatmap chunks: encode / decode speed and size.

The data: two-class softmax heatmaps ``(2, H, W)`` — a Gaussian-blurred white-noise field
(σ = ``--sigma`` heatmap pixels, unit variance) times 6 through a sigmoid, and its
complement — stored as float32, float16 and uint8 (``round(p * 255)``, as
:func:`tilefcn.write.encode_block`), chunked ``(2, 512, 512)`` like the heatmap stores.
Each codec writes and reads the whole array through a zarr in-memory store (the full codec
pipeline, one thread: zarr's pool and blosc's own threads are set to 1); the best of
``--repeat`` runs is kept. MB/s are of the *uncompressed* bytes; ratio = raw / stored.

    python benchmarks/bench_codec.py
    python benchmarks/bench_codec.py --size 4096 --repeat 5
    python benchmarks/bench_codec.py --data tissue --size 8192   # a real model's heatmap

Measured (AMD EPYC, idle 2-core machine; encode MB/s and ratio, ``--sigma 8`` | ``--sigma
24``; decode ran at 0.6–2.7 GB/s with all of them; ``tilefcn.write.COMPRESSORS`` holds the
choice)::

    codec                 float32               float16               uint8
    zstd 0 (default)      261 1.13 | 246 1.14   172 1.35 | 165 1.46   152 1.89 | 162 2.91
    zstd 1                486 1.12 | 562 1.13   355 1.31 | 308 1.41   235 1.71 | 301 2.40
    zstd 3                222 1.13 | 235 1.14   147 1.35 | 161 1.46   128 1.89 | 200 2.91
    zstd 5                 96 1.14 | 102 1.15   101 1.38 |  77 1.51    94 1.98 | 124 3.12
    blosc lz4 5 shuffle   729 1.30 | 841 1.39   428 1.37 | 610 1.73   361 1.45 | 362 1.90
    blosc zstd 1 shuffle  294 1.35 | 324 1.44   196 1.49 | 243 1.89   178 1.68 | 235 2.27
    blosc zstd 3 shuffle  142 1.39 | 154 1.48   105 1.69 | 139 2.06   105 1.89 | 119 2.84
    blosc zstd 5 shuffle   84 1.40 | 134 1.51    55 1.77 |  69 2.14    48 1.99 |  59 3.14

Bit shuffle, measured on 2026-12-03 (same machine; ``--sigma 8`` synthetic | the bundled
``tissue`` model's heatmap of an 8192² generated slide, ``--data tissue`` | the near-free
stride-1 model's of a 2048² one, ``--data stride1``)::

    codec                   float32                          float16
    blosc lz4 5 shuffle     884 1.30 | 1024 1.40 | 627 1.70   527 1.37 | 776 1.99 | 532 1.69
    blosc lz4 5 bitshuffle 1004 1.24 |  954 1.40 | 838 1.50   741 1.25 | 624 1.87 | 840 1.61
    blosc lz4 1 bitshuffle  942 1.22 | 1053 1.38 | 781 1.49   893 1.23 | 681 1.83 | 888 1.59

Bit shuffle is faster on two of the three but smaller on none, and slower on ``tissue``'s
float16: byte shuffle stays.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from tilefcn.write import encode_block

CHUNK = 512

CODECS: dict[str, tuple | None] = {
    "default (zstd 0)": None,
    "zstd 1": (ZstdCodec(level=1),),
    "zstd 3": (ZstdCodec(level=3),),
    "zstd 5": (ZstdCodec(level=5),),
    "blosc lz4 5 shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "blosc lz4 5 bitshuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
    "blosc lz4 1 bitshuffle": (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),),
    "blosc lz4 9 bitshuffle": (BloscCodec(cname="lz4", clevel=9, shuffle="bitshuffle"),),
    "blosc zstd 1 shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    "blosc zstd 1 bitshuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),),
    "blosc zstd 3 shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),),
    "blosc zstd 5 shuffle": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),),
    "none": (),
}


def heatmap(size: int, sigma: float, seed: int = 0) -> np.ndarray:
    """``(2, size, size)`` float32: ``p = sigmoid(6 z)``, ``z`` a blurred N(0, 1) field."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    z = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    z /= z.std()
    p = 1 / (1 + np.exp(-6 * z))
    return np.stack([p, 1 - p]).astype(np.float32)


def model_output(kind: str, size: int) -> np.ndarray:
    """A real model's float32 heatmap on a generated ``size``² JPEG-tiled slide: the bundled
    ``tissue`` model (3 classes, stride 8) or the near-free stride-1 model of
    ``bench_engine.py`` (1×1 conv, 2 channels)."""
    import sys
    import tempfile
    from pathlib import Path

    from tilefcn import predict
    from tilefcn.synthetic import write_slide

    slide = Path(tempfile.mkdtemp(prefix="tilefcn-codec-")) / "slide.ome.tif"
    write_slide(slide, (size, size), seed=size, compression="jpeg")
    if kind == "tissue":
        model = "tissue"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_engine import near_free

        model = near_free(1)
    return np.asarray(predict(str(slide), model, device="cpu").compute(), np.float32)


def measure(data: np.ndarray, compressors: tuple | None, repeat: int) -> tuple[float, ...]:
    """(encode MB/s, decode MB/s, ratio) of ``data`` through a chunked in-memory array."""
    mb = data.nbytes / 1e6
    enc = dec = float("inf")
    stored = 0
    for _ in range(repeat):
        store = MemoryStore()
        kw = {} if compressors is None else {"compressors": compressors}
        arr = zarr.create_array(store, shape=data.shape, chunks=(data.shape[0], CHUNK, CHUNK),
                                dtype=data.dtype, fill_value=0, **kw)
        t0 = time.perf_counter()
        arr[:] = data
        t1 = time.perf_counter()
        back = arr[:]
        t2 = time.perf_counter()
        if not np.array_equal(back, data):
            raise AssertionError("round trip changed the data")
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
        stored = sum(len(v) for k, v in store._store_dict.items() if "/c/" in f"/{k}")
    return mb / enc, mb / dec, data.nbytes / stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="heatmap side (default 2048)")
    parser.add_argument("--sigma", type=float, default=8.0, help="blur σ in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", choices=("synthetic", "tissue", "stride1"),
                        default="synthetic",
                        help="the blurred-noise heatmap, or a real model's output on a "
                             "generated slide of --size (tissue: --size 4096 gives 505²)")
    args = parser.parse_args()
    p = heatmap(args.size, args.sigma) if args.data == "synthetic" else \
        model_output(args.data, args.size)
    zarr.config.set({"threading.max_workers": 1})
    blosc.set_nthreads(1)
    for dtype in ("float32", "float16", "uint8"):
        data = encode_block(p, dtype)
        print(f"\n{dtype}  {data.shape}  chunks (2, {CHUNK}, {CHUNK})  {data.nbytes / 1e6:.1f} MB")
        print(f"{'codec':<22}{'enc MB/s':>10}{'dec MB/s':>10}{'ratio':>8}")
        for name, compressors in CODECS.items():
            e, d, r = measure(data, compressors, args.repeat)
            print(f"{name:<22}{e:>10.0f}{d:>10.0f}{r:>8.2f}")


if __name__ == "__main__":
    main()
