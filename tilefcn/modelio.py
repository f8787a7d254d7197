"""Loading and saving models: bundles (JSON + safetensors), ExportedPrograms, TorchScript.

Model files never execute code on load: bundles name an architecture from the registry in
:mod:`tilefcn.models`; ExportedPrograms and TorchScript are graphs; pickled checkpoints are
refused. A Python factory ``package.module:function`` is explicit, trusted user code.
"""

from __future__ import annotations

import importlib
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zlib import error as zlib_error

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tilefcn import __version__
from tilefcn.geometry import Geometry
from tilefcn.models import ARCHITECTURES, BUNDLED_DIR, bundled_names
from tilefcn.models.fingerprint import module_fingerprint, state_sha256

BUNDLE_FORMAT = "tilefcn-bundle/1"


@dataclass(frozen=True, slots=True)
class Scaling:
    """Input scaling: ``x / divisor`` (``"dtype"``: the dtype's maximum; floats unchanged),
    then ``(x - mean) / std`` per channel when given."""

    divisor: str | float = "dtype"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"divisor": self.divisor, "mean": self.mean and list(self.mean),
                "std": self.std and list(self.std)}

    @classmethod
    def from_dict(cls, data: dict | None) -> Scaling:
        data = data or {}
        mean, std = data.get("mean"), data.get("std")
        return cls(data.get("divisor", "dtype"), mean and tuple(mean), std and tuple(std))


@dataclass(frozen=True)
class Model:
    """A network ready for tiled inference, with what tilefcn needs to know about it.

    ``spec`` says how a worker process reloads it (a built-in name or a path); it is ``None``
    for in-memory modules, which are then shipped to workers once (pickled by dask).
    """

    module: nn.Module
    name: str
    in_channels: int
    classes: tuple[str, ...]
    geometry: Geometry
    scaling: Scaling = Scaling()
    patch_size: tuple[int, int] | None = None
    sha256: str = ""
    spec: str | None = None
    card: dict = field(default_factory=dict)
    fingerprint: str = ""  # what the module computes: architecture + weights (cache key)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (used by ``tilefcn info`` and the heatmap attributes)."""
        return {
            "name": self.name, "sha256": self.sha256, "spec": self.spec,
            "in_channels": self.in_channels, "classes": list(self.classes),
            "geometry": self.geometry.to_dict(), "scaling": self.scaling.to_dict(),
            "patch_size": self.patch_size and list(self.patch_size),
            "parameters": sum(p.numel() for p in self.module.parameters()),
        }


class ModelFileError(ValueError):
    """A model spec that cannot be loaded (missing, unsafe, or malformed)."""


def as_eval(module: nn.Module) -> nn.Module:
    """``module.eval()``; ExportedProgram modules refuse ``eval()`` and are inference graphs
    already (their BatchNorm/Dropout behaviour was fixed at export)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def from_module(module: nn.Module, *, in_channels: int | None = None,
                classes: list[str] | tuple[str, ...] | None = None, name: str | None = None,
                scaling: Scaling | None = None, spec: str | None = None,
                geometry: Geometry | None = None, patch_size: tuple[int, int] | None = None,
                card: dict | None = None, owned: bool = False,
                program: torch.export.ExportedProgram | None = None) -> Model:
    """Wrap an ``nn.Module``: measure its geometry and count its classes.

    A user's module (``owned=False``) is never changed: it is copied, and refused if a layer
    whose output depends on training mode is in training mode. Modules tilefcn built itself
    (bundles, factories, files: ``owned``) are put in eval mode. Measured geometries are
    remembered per process by :func:`module_fingerprint` and channels, so predicting with the
    same module again does not measure it again, and an edited module is measured anew.
    """
    from tilefcn.measure import in_channels_of, refuse_training_mode
    from tilefcn.measure.shapes import copy_module

    if owned:
        module = as_eval(module)
    else:
        refuse_training_mode(module)
        module = copy_module(module)
    if in_channels is None:
        in_channels = _program_channels(program) if program is not None else None
    in_channels = in_channels or in_channels_of(module)
    sha256 = state_sha256(module)
    fingerprint = module_fingerprint(module, sha256)
    geometry = geometry or _measured(program or module, module, in_channels, fingerprint)
    if classes is None:
        classes = [f"class{i}" for i in range(_count_outputs(module, in_channels, geometry))]
    return Model(module, name or type(module).__name__, in_channels, tuple(classes), geometry,
                 scaling or Scaling(), patch_size, sha256, spec, card or {},
                 fingerprint)


def _program_channels(program: torch.export.ExportedProgram) -> int | None:
    """Channels of the program's image input, read from its signature."""
    users = {s.arg.name for s in program.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in users and getattr(val, "dim", None) \
                and val.dim() == 4 and isinstance(val.shape[1], int):
            return val.shape[1]
    return None


_GEOMETRIES: dict[tuple[str, int], Geometry] = {}
_GEOMETRIES_MAX = 256


def _measured(target: Any, module: nn.Module, in_channels: int, fingerprint: str) -> Geometry:
    from tilefcn.measure import measure

    key = (fingerprint, in_channels)
    if key not in _GEOMETRIES:
        if len(_GEOMETRIES) >= _GEOMETRIES_MAX:
            _GEOMETRIES.pop(next(iter(_GEOMETRIES)))
        _GEOMETRIES[key] = measure(target, in_channels, runtime=module).geometry
    return _GEOMETRIES[key]


def _count_outputs(module: nn.Module, in_channels: int, geometry: Geometry) -> int:
    from tilefcn.measure.shapes import accepted_size

    side = max(*geometry.receptive_field, *geometry.min_input)
    return accepted_size(module, in_channels, side, max(geometry.alignment) + 1)[1][1]


# -- bundles -----------------------------------------------------------------------------

def save_bundle(path: str | Path, module: nn.Module, *, architecture: str,
                kwargs: dict[str, Any], classes: list[str] | tuple[str, ...], in_channels: int,
                scaling: Scaling | None = None, patch_size: tuple[int, int] | None = None,
                convolutionalized: bool = False, probabilities: bool = False,
                card: dict | None = None) -> Path:
    """Write ``model.json`` + ``weights.safetensors`` into directory ``path``.

    ``architecture``/``kwargs`` must rebuild ``module`` from :data:`ARCHITECTURES` (followed
    by ``convolutionalize(…, patch_size)`` when ``convolutionalized``). With
    ``probabilities``, loading appends a softmax over classes (pointwise, so still local).
    """
    if architecture not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {architecture!r}; known: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = from_module(_with_softmax(module) if probabilities else module,
                        in_channels=in_channels, classes=classes, scaling=scaling,
                        patch_size=patch_size)
    meta = {
        "format": BUNDLE_FORMAT, "tilefcn_version": __version__,
        "architecture": architecture, "kwargs": kwargs,
        "convolutionalized": convolutionalized, "patch_size": patch_size and list(patch_size),
        "output": "probabilities" if probabilities else "logits",
        "in_channels": in_channels, "classes": list(classes),
        "scaling": model.scaling.to_dict(), "geometry": model.geometry.to_dict(),
        "sha256": model.sha256, "card": card or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / "weights.safetensors"))
    (path / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _with_softmax(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(module, nn.Softmax(dim=1))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _load_bundle(path: Path, spec: str) -> Model:
    where, weights = path / "model.json", path / "weights.safetensors"
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"cannot read {where}: {_first_line(exc)}") from None
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ModelFileError(f"{where}: unknown architecture {arch!r}; known: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    try:  # everything below reads model.json's fields: a wrong one names the file
        patch = meta.get("patch_size")
        module = ARCHITECTURES[arch](**meta.get("kwargs", {}))
        if meta.get("convolutionalized"):
            from tilefcn.convert import convolutionalize

            module = convolutionalize(module, tuple(patch))
        in_channels, classes = int(meta["in_channels"]), [str(c) for c in meta["classes"]]
        geometry = Geometry.from_dict(meta["geometry"]) if "geometry" in meta else None
        scaling = Scaling.from_dict(meta.get("scaling"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{where}: not a valid tilefcn model description "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not weights.is_file():
        raise ModelFileError(f"{path}: missing weights.safetensors")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type, OSError, …
        raise ModelFileError(f"{weights}: not a readable safetensors file: "
                             f"{_first_line(exc)}") from None
    try:
        module.load_state_dict(state)
    except (RuntimeError, OSError) as exc:
        raise ModelFileError(f"{weights}: weights do not fit {arch}: {_first_line(exc)}"
                             ) from None
    if meta.get("output") == "probabilities":
        module = _with_softmax(module)
    return from_module(module, in_channels=in_channels, classes=classes, name=path.name,
                       scaling=scaling, spec=spec, geometry=geometry, card=meta.get("card", {}),
                       patch_size=tuple(patch) if patch else None, owned=True)


# -- graph files -------------------------------------------------------------------------

def save_exported(path: str | Path, model: Model, example_size: int | None = None) -> Path:
    """Save ``model`` as an ExportedProgram (dynamic H/W: every size the network accepts) with
    its metadata and measured geometry as an extra file."""
    from tilefcn.measure.shapes import accepted_size, export_program

    g = model.geometry
    size = example_size or accepted_size(model.module, model.in_channels,
                                         max(64, *g.receptive_field, *g.min_input))[0]
    program = export_program(as_eval(model.module), model.in_channels, size, oblivious=True)
    meta = {"classes": list(model.classes), "in_channels": model.in_channels,
            "scaling": model.scaling.to_dict(), "name": model.name,
            "geometry": model.geometry.to_dict()}
    torch.export.save(program, str(path), extra_files={"tilefcn.json": json.dumps(meta)})
    return Path(path)


def _load_exported(path: Path, spec: str, geometry: Geometry | None = None) -> Model:
    from tilefcn.measure.shapes import quiet_torch

    extra = {"tilefcn.json": ""}
    try:
        with quiet_torch():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file means the same
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path}: not a readable ExportedProgram (.pt2) file: {detail}"
                             ) from None
    try:
        meta = json.loads(extra["tilefcn.json"]) if extra["tilefcn.json"] else {}
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: its tilefcn.json metadata is not valid JSON") from None
    if geometry is None and isinstance(meta.get("geometry"), dict):
        geometry = Geometry.from_dict(meta["geometry"])
    return from_module(program.module(), in_channels=meta.get("in_channels"), geometry=geometry,
                       classes=meta.get("classes"), name=meta.get("name", path.stem),
                       scaling=Scaling.from_dict(meta.get("scaling")), spec=spec, owned=True,
                       program=program)


def _pickled(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path} is a pickled PyTorch checkpoint: tilefcn never unpickles model files. In trusted "
        "code, build the module, load its state dict with torch.load(..., weights_only=True), and "
        "save it with tilefcn.save_bundle(...) or torch.export.save(...)")


def _load_torch_file(path: Path, spec: str, geometry: Geometry | None = None) -> Model:
    """A TorchScript or ExportedProgram zip archive, told apart by its entries (read with
    :mod:`zipfile`, nothing unpickled); pickles and anything else are refused first."""
    from tilefcn.measure.shapes import quiet_torch

    with path.open("rb") as file:
        head = file.read(4)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickled(path)  # a legacy torch.save or a plain pickle
    if head != b"PK\x03\x04":
        raise ModelFileError(f"{path}: not a model file (expected a TorchScript or "
                             "ExportedProgram archive, a bundle folder or a built-in name)")
    try:  # every entry's CRC, before torch reads any of it (some parts it reads lazily)
        with zipfile.ZipFile(path) as archive:
            names, bad = archive.namelist(), archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"bad CRC in {bad}")
    except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as exc:
        raise ModelFileError(f"{path}: the model archive is truncated or corrupt "
                             f"({_first_line(exc)})") from None
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        try:
            with quiet_torch():
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure to read the file means the same
            raise ModelFileError(f"{path}: not a readable TorchScript file: "
                                 f"{_first_line(exc)}") from None
        for param in module.parameters():  # inference only; and no .grad warning on .to()
            param.requires_grad_(False)
        return from_module(module, name=path.stem, spec=spec, geometry=geometry, owned=True)
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return _load_exported(path, spec, geometry)
    raise _pickled(path)


def _load_factory(spec: str, geometry: Geometry | None = None) -> Model:
    module_name, _, func_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelFileError(f"cannot import model factory {spec!r}: {exc}") from None
    built = factory()
    if isinstance(built, Model):
        return replace(built, spec=spec)
    if not isinstance(built, nn.Module):
        raise ModelFileError(f"factory {spec!r} returned {type(built).__name__}, not a module")
    return from_module(built, name=func_name, spec=spec, geometry=geometry, owned=True)


def _is_path_spec(spec: str | os.PathLike) -> bool:
    """Whether a model spec is clearly a path: a ``Path``, or text with a separator,
    ``.``/``~`` at the start, or absolute (``./tissue``, ``models/tissue``, ``/opt/m``)."""
    text = os.fspath(spec)
    return (isinstance(spec, os.PathLike) or text.startswith((".", "~"))
            or any(sep and sep in text for sep in ("/", os.sep, os.altsep)))


def load_model(spec: str | Path | nn.Module | Model, *,
               geometry: Geometry | None = None) -> Model:
    """Load a model from a built-in name, a bundle directory, a ``.pt2`` ExportedProgram,
    a TorchScript file, a ``package.module:function`` factory, or wrap an ``nn.Module``.
    Built-in names win over local folders of the same name unless the spec is clearly a
    path (``./tissue``).

    ``geometry``, when already known (workers reloading a model the client measured), skips
    measuring it again; bundles carry theirs in ``model.json``.
    """
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, nn.Module):
        return from_module(spec, geometry=geometry)
    text = str(spec)
    path = Path(text).expanduser()
    if text in bundled_names() and not _is_path_spec(spec):  # a folder "tissue" in the
        return _load_bundle(BUNDLED_DIR / text, text)         # cwd does not shadow it
    if path.is_dir():
        if not (path / "model.json").is_file():
            raise ModelFileError(f"{path} is not a model bundle (no model.json)")
        return _load_bundle(path, str(path.resolve()))
    if path.is_file():
        if path.suffix == ".pt2":
            return _load_exported(path, str(path.resolve()), geometry)
        if path.suffix == ".json" and path.name == "model.json":
            return _load_bundle(path.parent, str(path.parent.resolve()))
        return _load_torch_file(path, str(path.resolve()), geometry)
    if ":" in text and not path.suffix and "/" not in text:
        return _load_factory(text, geometry)
    known = ", ".join(bundled_names()) or "none bundled"
    raise ModelFileError(f"no such model: {text!r} (not a file, bundle directory or built-in "
                         f"name; built-in: {known})")
