"""tilefcn.casts: float16 ↔ float32 through torch gives numpy's bits, on every layout."""

from __future__ import annotations

import numpy as np
import pytest

from tilefcn.casts import astype, copy_into

RNG = np.random.default_rng(5)


def _values(dtype: str) -> np.ndarray:
    """Normals, subnormals, float16 overflow, NaN, ±inf, -0 — as a (2, 64, 70) array."""
    x = np.concatenate([RNG.standard_normal(4000) * 1e-5, RNG.random(4000) * 70000,
                        RNG.standard_normal(952),
                        [np.nan, np.inf, -np.inf, 65504, 65520, 1e-8, 6e-8, -0.0]])
    with np.errstate(over="ignore"):
        return x.astype(np.float32).astype(dtype).reshape(2, 64, 70)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("src", "dst"), [("float32", "float16"), ("float16", "float32"),
                                          ("float64", "float16"), ("float32", "uint8")])
def test_astype_equals_numpy_bit_for_bit(src: str, dst: str) -> None:
    base = _values(src) if dst != "uint8" else (RNG.random((2, 64, 70)) * 255).astype(src)
    frozen = base.copy()
    frozen.flags.writeable = False
    for a in (base, base[:, ::2, 1::3], base[:, ::-1], frozen,
              base.astype(base.dtype.newbyteorder())):
        with np.errstate(over="ignore", invalid="ignore"):
            ref = a.astype(dst)
            got = astype(a, dst)
        assert _same_bits(np.ascontiguousarray(got), np.ascontiguousarray(ref))


def test_astype_same_dtype_is_the_array_and_copy_into_fills_views() -> None:
    a = _values("float32")
    assert astype(a, "float32") is a
    out = np.zeros((2, 64, 140), np.float16)
    copy_into(out[:, :, ::2], a)  # a strided destination
    with np.errstate(over="ignore"):
        assert _same_bits(np.ascontiguousarray(out[:, :, ::2]), a.astype(np.float16))
    assert not out[:, :, 1::2].any()
