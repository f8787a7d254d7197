"""Disk full (an injected ENOSPC from the chunk writer) and Ctrl-C mid-run: one line, the
right exit code, a store that says ``running``, and ``--resume`` finishes it exactly."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from models_zoo import padded, random_image, whole_image_output

from tilefcn.cli import main
from tilefcn.modelio import load_model, save_exported
from tilefcn.sinks import ZarrSink


@pytest.mark.parametrize("failure,code,message", [
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "Error: no space left on device while writing; free some space, then run the same "
     "command with --resume"),
    (KeyboardInterrupt(), 130, "Interrupted: run the same command with --resume to continue "
     "(a cohort: the same command)."),
])
def test_a_failed_write_leaves_a_resumable_store(tmp_path, monkeypatch, failure, code,
                                                 message):
    image = random_image(np.random.default_rng(5), (300, 280), 3, "uint8")
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, image, tile=(64, 64), photometric="rgb")
    model = save_exported(tmp_path / "m.pt2", load_model(padded(3)))
    out = tmp_path / "heat.zarr"
    args = ["run", str(scan), "--model", str(model), "--out", str(out), "--tile", "64", "-q",
            "--workers", "1"]
    real, calls = ZarrSink.__call__, []

    def full(sink, tile, block):
        calls.append(tile.index)
        if len(calls) > 4:
            raise failure
        return real(sink, tile, block)

    monkeypatch.setattr(ZarrSink, "__call__", full)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert result.output.strip() == message
    assert zarr.open_group(str(out), mode="r").attrs["tilefcn"]["status"] == "running"
    monkeypatch.setattr(ZarrSink, "__call__", real)
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["tilefcn"]["status"] == "complete"
    np.testing.assert_allclose(group["0"][:], whole_image_output(padded(3), image), rtol=0,
                               atol=1e-5)
