"""Fuzzed TIFFs: mutated headers, IFD entries and tile offsets of a small file give only
tilefcn's own one-line errors (ValueError "cannot read …", or a clean read), each case within
a time bound; an absurd declared size is refused at open, before anything is allocated."""

from __future__ import annotations

import io
import signal
import struct

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilefcn.read import open_scan

SECONDS = 5  # per case


def _base() -> bytes:
    buffer = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    tifffile.imwrite(buffer, image, tile=(16, 16), photometric="rgb", compression="zlib")
    return buffer.getvalue()


BASE = _base()


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise _Hang


def _open_and_read(path) -> None:
    scan = open_scan(path)
    h, w, _ = scan.info.shape
    scan.reader[0:min(h, 64), 0:min(w, 64)]


def _check(path) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        _open_and_read(path)
    except _Hang:
        pytest.fail(f"no answer within {SECONDS} s")
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc).strip()
        assert message and "\n" not in message, repr(message)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_mutated_bytes_give_only_clean_errors(tmp_path, edits):
    data = bytearray(BASE)
    for position, value in edits:
        data[position] = value
    path = tmp_path / "fuzz.tif"
    path.write_bytes(bytes(data))
    _check(path)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_mutated_tile_offsets_and_counts(tmp_path, offset, count):
    tif = tifffile.TiffFile(io.BytesIO(BASE))
    page = tif.pages[0]
    offsets, counts = page.tags["TileOffsets"], page.tags["TileByteCounts"]
    data = bytearray(BASE)
    struct.pack_into("<I", data, offsets.valueoffset + 4 * 3, offset)  # the 4th tile
    struct.pack_into("<I", data, counts.valueoffset + 4 * 5, count)  # the 6th tile
    path = tmp_path / "offsets.tif"
    path.write_bytes(bytes(data))
    _check(path)


def test_an_absurd_declared_size_is_refused_at_open(tmp_path):
    tif = tifffile.TiffFile(io.BytesIO(BASE))
    page = tif.pages[0]
    data = bytearray(BASE)
    for name in ("ImageWidth", "ImageLength"):
        tag = page.tags[name]
        fmt = "<I" if tag.dtype == 4 else "<H"
        value = 10**9 if fmt == "<I" else 65535
        struct.pack_into(fmt, data, tag.valueoffset, value)
    path = tmp_path / "huge.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot read"):
        _open_and_read(path)
