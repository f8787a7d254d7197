"""Bad input through `tilefcn run`: a table of cases, each one line naming the problem, the
right exit code (2 input/usage, 1 runtime), no traceback, and nothing existing modified."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner
from models_zoo import padded, random_image

from tilefcn import cluster as tilefcn_cluster
from tilefcn.cli import main
from tilefcn.modelio import load_model, save_exported

GOOD_MODEL = "good.pt2"  # in the models folder (module fixture); cases name it by this


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A good model file and a non-local TorchScript (outside the cases' folder)."""
    folder = tmp_path_factory.mktemp("models")
    save_exported(folder / GOOD_MODEL, load_model(padded(3)))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 32, 32)), str(folder / "gn.ts"))
    return folder


def _rgb(path: Path, seed: int = 0, shape: tuple[int, int] = (96, 96), **kw) -> Path:
    image = random_image(np.random.default_rng(seed), shape, 3, "uint8")
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", **kw)
    return path


def _run(*args: str | Path) -> list[str]:
    return ["run", *(str(a) for a in args), "-q"]


def _write_heatmap(tmp: Path, models: Path, source: Path, out: Path) -> None:
    result = CliRunner().invoke(main, _run(source, "--model", models / GOOD_MODEL, "--out",
                                           out, "--device", "cpu"))
    assert result.exit_code == 0, result.output


# -- setups: each writes its inputs into tmp and returns the CLI arguments -----------------

def _missing(tmp, m):
    return _run(tmp / "missing.tif", "--model", m / GOOD_MODEL)


def _zero_bytes(tmp, m):
    (tmp / "zero.tif").write_bytes(b"")
    return _run(tmp / "zero.tif", "--model", m / GOOD_MODEL)


def _truncated(tmp, m):
    data = _rgb(tmp / "full.tif").read_bytes()
    (tmp / "full.tif").write_bytes(data[: len(data) // 2])
    return _run(tmp / "full.tif", "--model", m / GOOD_MODEL)


def _not_a_tiff(tmp, m):
    (tmp / "photo.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return _run(tmp / "photo.tif", "--model", m / GOOD_MODEL)


def _directory(tmp, m):
    (tmp / "slides").mkdir()
    return _run(tmp / "slides", "--model", m / GOOD_MODEL)


def _corrupt_tile(tmp, m):
    path = _rgb(tmp / "scan.tif", shape=(128, 128), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # a tile in the middle
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(range(256)) * (count // 256) + b"\0" * (count % 256)
    path.write_bytes(bytes(data))
    return _run(path, "--model", m / GOOD_MODEL, "--out", tmp / "h.zarr")


def _channels(tmp, m):
    tifffile.imwrite(tmp / "gray.tif", np.zeros((80, 80), np.uint8))
    return _run(tmp / "gray.tif", "--model", m / GOOD_MODEL)


def _complex(tmp, m):
    tifffile.imwrite(tmp / "fft.tif", np.zeros((64, 64, 3), np.complex64),
                     photometric="minisblack")
    return _run(tmp / "fft.tif", "--model", m / GOOD_MODEL)


def _scan_with(*extra: str | Path):
    def setup(tmp, m):
        return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, *extra)
    return setup


def _missing_model(tmp, m):
    return _run(_rgb(tmp / "s.tif"), "--model", tmp / "nothere.pt2")


def _garbage(name: str) -> Callable:
    def setup(tmp, m):
        (tmp / name).write_bytes(bytes(np.random.default_rng(5).integers(0, 256, 4000,
                                                                           dtype=np.uint8)))
        return _run(_rgb(tmp / "s.tif"), "--model", tmp / name)
    return setup


def _truncated_torchscript(tmp, m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(padded(3), torch.rand(1, 3, 32, 32)), str(tmp / "m.ts"))
    data = (tmp / "m.ts").read_bytes()
    (tmp / "m.ts").write_bytes(data[: len(data) // 2])
    return _run(_rgb(tmp / "s.tif"), "--model", tmp / "m.ts")


def _bundle(json_text: str, weights: bytes | None) -> Callable:
    def setup(tmp, m):
        (tmp / "bundle").mkdir()
        (tmp / "bundle" / "model.json").write_text(json_text)
        if weights is not None:
            (tmp / "bundle" / "weights.safetensors").write_bytes(weights)
        return _run(_rgb(tmp / "s.tif"), "--model", tmp / "bundle")
    return setup


_GOOD_JSON = ('{"architecture": "small_fcn", "kwargs": {}, "in_channels": 3, '
              '"classes": ["a", "b"]}')


def _pickle_checkpoint(tmp, m):
    torch.save(padded(3).state_dict(), tmp / "ckpt.pt")
    return _run(_rgb(tmp / "s.tif"), "--model", tmp / "ckpt.pt")


def _plain_pickle(tmp, m):
    (tmp / "model.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return _run(_rgb(tmp / "s.tif"), "--model", tmp / "model.pkl")


def _non_local(tmp, m):
    return _run(_rgb(tmp / "s.tif"), "--model", m / "gn.ts", "--out", tmp / "h.zarr")


def _exists(tmp, m):
    _write_heatmap(tmp, m, _rgb(tmp / "s.tif"), tmp / "s.heatmap.zarr")
    return _run(tmp / "s.tif", "--model", m / GOOD_MODEL)


def _overwrite_foreign(tmp, m):
    (tmp / "photos.zarr").mkdir()
    (tmp / "photos.zarr" / "keep.txt").write_text("precious")
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--out", tmp / "photos.zarr",
                "--overwrite")


def _resume_foreign(tmp, m):
    zarr.open_group(tmp / "other.zarr", mode="w").attrs["x"] = 1
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--out", tmp / "other.zarr",
                "--resume")


def _resume_foreign_tiff(tmp, m):
    tifffile.imwrite(tmp / "h.tif", np.zeros((8, 8), np.uint8))
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--out", tmp / "h.tif",
                "--resume")


def _resume_other_source(tmp, m):
    _write_heatmap(tmp, m, _rgb(tmp / "a.tif", seed=1), tmp / "heat.zarr")
    return _run(_rgb(tmp / "b.tif", seed=2), "--model", m / GOOD_MODEL, "--out",
                tmp / "heat.zarr", "--resume")


def _missing_mask(tmp, m):
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--mask", tmp / "mask.tif",
                "--out", tmp / "h.zarr")


def _out_under_a_file(tmp, m):
    (tmp / "notes.txt").write_text("keep me")
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--out",
                tmp / "notes.txt" / "h.zarr")


def _unreachable_scheduler(tmp, m):
    return _run(_rgb(tmp / "s.tif"), "--model", m / GOOD_MODEL, "--scheduler",
                "tcp://127.0.0.1:9")


@dataclass(frozen=True)
class Case:
    setup: Callable[[Path, Path], list[str]]
    code: int
    message: str  # a regex the one "Error:" line must contain
    writes: bool = False  # may leave a new store (status "running"), never a complete one


CASES = {
    "missing file": Case(_missing, 2, r"no such file: .*missing\.tif"),
    "zero-byte file": Case(_zero_bytes, 2, r"cannot read .*zero\.tif: not a TIFF file"),
    "truncated TIFF": Case(_truncated, 2, r"cannot read .*full\.tif: file is truncated"),
    "not a TIFF (.tif suffix)": Case(_not_a_tiff, 2, r"photo\.tif: not a TIFF file"),
    "directory as input": Case(_directory, 2, r"slides: a directory, not an image"),
    "corrupt tile mid-scan": Case(_corrupt_tile, 2, r"cannot read .*scan\.tif: ", True),
    "channels vs model": Case(_channels, 2, r"has 1 channel\(s\) but model .* expects 3"),
    "complex64 pixels": Case(_complex, 2, r"unsupported pixel type complex64"),
    "--level out of range": Case(_scan_with("--level", "4"), 2,
                                 r"level 4 not in .*available levels: 0 \(96x96\)"),
    "--mpp without pixel size": Case(_scan_with("--mpp", "0.5"), 2,
                                     r"no pixel size in .*s\.tif"),
    "--mpp negative": Case(_scan_with("--mpp", "-1"), 2, r"Invalid value for '--mpp'"),
    "--level and --mpp": Case(_scan_with("--level", "0", "--mpp", "1"), 2,
                              r"give --level or --mpp, not both"),
    "--tile 0": Case(_scan_with("--tile", "0"), 2, r"Invalid value for '--tile': 0 "),
    "--tile -5": Case(_scan_with("--tile", "-5"), 2, r"Invalid value for '--tile': -5 "),
    "--tile abc": Case(_scan_with("--tile", "abc"), 2, r"'abc' is not a valid integer"),
    "--sub-tile 0": Case(_scan_with("--sub-tile", "0"), 2, r"Invalid value for '--sub-tile'"),
    "missing model file": Case(_missing_model, 2, r"no such model: .*nothere\.pt2"),
    "garbage .pt2": Case(_garbage("junk.pt2"), 2,
                         r"junk\.pt2: not a readable ExportedProgram"),
    "garbage .pt": Case(_garbage("junk.pt"), 2, r"junk\.pt: not a model file"),
    "truncated TorchScript": Case(_truncated_torchscript, 2,
                                  r"m\.ts: the model archive is truncated or corrupt"),
    "bundle: broken model.json": Case(_bundle("{broken", None), 2,
                                      r"cannot read .*bundle/model\.json"),
    "bundle: bad field": Case(_bundle('{"architecture": "small_fcn", "kwargs": {"x": 1}}',
                                      None), 2, r"bundle/model\.json: not a valid tilefcn"),
    "bundle: garbage weights": Case(_bundle(_GOOD_JSON, b"\xff" * 300), 2,
                                    r"weights\.safetensors: not a readable safetensors"),
    "pickle checkpoint": Case(_pickle_checkpoint, 2, r"ckpt\.pt is a pickled PyTorch"),
    "plain pickle": Case(_plain_pickle, 2, r"model\.pkl is a pickled PyTorch"),
    "non-local model": Case(_non_local, 2, r"the model is not local"),
    "unknown --out suffix": Case(_scan_with("--out", "ihc.png"), 2,
                                 r"unknown output suffix '\.png' .*\.zarr .*\.tif/\.tiff"),
    "output exists": Case(_exists, 2, r"output exists: .*s\.heatmap\.zarr \(use --overwrite"),
    "--overwrite foreign folder": Case(_overwrite_foreign, 2,
                                       r"refusing to overwrite .*photos\.zarr: not a tilefcn"),
    "--resume foreign store": Case(_resume_foreign, 2,
                                   r"cannot resume .*other\.zarr: not a tilefcn heatmap"),
    "--resume other source": Case(_resume_other_source, 2,
                                  r"cannot resume .*heat\.zarr: it was written from another "
                                  r"source \(path .*a\.tif vs .*b\.tif\)"),
    "--resume a foreign TIFF": Case(_resume_foreign_tiff, 2,
                                    r"cannot resume .*h\.tif: not a tilefcn heatmap"),
    "--overwrite and --resume": Case(_scan_with("--overwrite", "--resume"), 2,
                                     r"give --overwrite or --resume, not both"),
    "missing --mask file": Case(_missing_mask, 2, r"no such file: .*mask\.tif"),
    "output under a file": Case(_out_under_a_file, 2,
                                r"cannot write .*notes\.txt/h\.zarr: .*notes\.txt is a file"),
    "unreachable scheduler": Case(_unreachable_scheduler, 1,
                                  r"cannot reach the dask scheduler"),
}


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: (mtime_ns, size, sha256 of a file's bytes)."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size, digest)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, models, monkeypatch):
    monkeypatch.setattr(tilefcn_cluster, "SCHEDULER_TIMEOUT", "2s")
    monkeypatch.chdir(tmp_path)  # relative --out paths land in the snapshot folder
    case = CASES[name]
    args = case.setup(tmp_path, models)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(case.message, lines[0]), lines[0]
    assert "Traceback" not in result.output and "Warning" not in result.output
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    new = sorted(set(after) - set(before))
    if not case.writes:
        assert new == [], new
    for store in {Path(n).parts[0] for n in new}:  # a store left behind never looks done
        assert zarr.open_group(tmp_path / store, mode="r").attrs["tilefcn"]["status"] \
            == "running"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_a_gpu(tmp_path, models):
    result = CliRunner().invoke(main, _run(_rgb(tmp_path / "s.tif"), "--model",
                                           models / GOOD_MODEL, "--device", "cuda"))
    assert result.exit_code == 2 and result.output.startswith("Error: device 'cuda'")
    assert not (tmp_path / "s.heatmap.zarr").exists()


@pytest.mark.parametrize("args,code", [
    (["run", "missing.tif"], 2),
    (["run", "missing.tif", "--tile", "0"], 2),
])
def test_debug_keeps_the_exit_code_and_shows_the_traceback(tmp_path, monkeypatch, args,
                                                           code):
    monkeypatch.chdir(tmp_path)
    plain = CliRunner().invoke(main, args)
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert plain.exit_code == debug.exit_code == code
    assert "Traceback" not in plain.output and "Traceback" in debug.output
    assert debug.output.strip().splitlines()[-1] == plain.output.strip()


def test_garbage_models_print_one_line_from_the_real_command(tmp_path, models):
    """Through the console script: torch writes nothing of its own to stdout or stderr (file
    descriptors, not just Python's streams)."""
    exe = shutil.which("tilefcn", path=str(Path(sys.executable).parent))
    assert exe, "the tilefcn console script is missing"
    scan = _rgb(tmp_path / "s.tif")
    ts = tmp_path / "flipped.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(padded(3), torch.rand(1, 3, 32, 32)), str(ts))
    data = bytearray(ts.read_bytes())
    data[len(data) // 3: len(data) // 3 + 200] = bytes(200)  # corrupt inside the archive
    ts.write_bytes(bytes(data))
    flipped = tmp_path / "flipped.pt2"
    data = bytearray((models / GOOD_MODEL).read_bytes())
    data[len(data) // 3: len(data) // 3 + 200] = bytes(200)
    flipped.write_bytes(bytes(data))
    for model in (ts, flipped):
        proc = subprocess.run([exe, "run", str(scan), "--model", str(model), "-q"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONWARNINGS": "default"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {model}"), proc.stderr


def test_builtin_name_is_not_shadowed_by_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tissue").mkdir()  # a stray folder (no model.json) named like the bundle
    model = load_model("tissue")
    assert model.spec == "tissue" and model.classes == ("background", "tissue", "dense")
    from tilefcn.modelio import ModelFileError

    with pytest.raises(ModelFileError, match="not a model bundle"):
        load_model("./tissue")  # clearly a path: the folder is meant
    with pytest.raises(ModelFileError, match="not a model bundle"):
        load_model(tmp_path / "tissue")
