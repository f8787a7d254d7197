"""Loading and saving models: bundles (JSON + safetensors), ExportedPrograms, TorchScript.

Model files never execute code on load: bundles name an architecture from the registry in
:mod:`tilefcn.models`; ExportedPrograms and TorchScript are graphs; pickled checkpoints are
refused. A Python factory ``package.module:function`` is explicit, trusted user code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tilefcn import __version__
from tilefcn.geometry import Geometry
from tilefcn.models import ARCHITECTURES, BUNDLED_DIR, bundled_names

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


def _infer_in_channels(module: nn.Module) -> int | None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    return None


def state_sha256(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, raw bytes), order-independent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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
                card: dict | None = None) -> Model:
    """Wrap an ``nn.Module``: measure its geometry and count its classes on a meta tensor.

    Measured geometries are remembered per process by (architecture, weights, channels), so
    predicting with the same in-memory module again does not measure it again.
    """
    module = as_eval(module)
    in_channels = in_channels or _infer_in_channels(module) or 3
    sha256 = state_sha256(module)
    geometry = geometry or _measured(module, in_channels, sha256)
    if classes is None:
        classes = [f"class{i}" for i in range(_count_outputs(module, in_channels, geometry))]
    return Model(module, name or type(module).__name__, in_channels, tuple(classes), geometry,
                 scaling or Scaling(), patch_size, sha256, spec, card or {})


_GEOMETRIES: dict[tuple[str, str, int], Geometry] = {}


def _measured(module: nn.Module, in_channels: int, sha256: str) -> Geometry:
    from tilefcn.measure import measure_geometry

    key = (repr(module), sha256, in_channels)
    if key not in _GEOMETRIES:
        _GEOMETRIES[key] = measure_geometry(module, in_channels)
    return _GEOMETRIES[key]


def _count_outputs(module: nn.Module, in_channels: int, geometry: Geometry) -> int:
    from tilefcn.infer import output_shape

    side = max(geometry.receptive_field) + 4 * max(geometry.alignment)
    return output_shape(module, in_channels, (side, side), geometry)[0]


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


def _load_bundle(path: Path, spec: str) -> Model:
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"cannot read {path / 'model.json'}: {exc}") from None
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"{path}: unknown architecture {arch!r}")
    module = ARCHITECTURES[arch](**meta.get("kwargs", {}))
    patch = meta.get("patch_size")
    if meta.get("convolutionalized"):
        from tilefcn.convert import convolutionalize

        module = convolutionalize(module, tuple(patch))
    weights = path / "weights.safetensors"
    if not weights.is_file():
        raise ModelFileError(f"{path}: missing weights.safetensors")
    try:
        module.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise ModelFileError(f"{weights}: weights do not fit {arch}: {exc}") from None
    if meta.get("output") == "probabilities":
        module = _with_softmax(module)
    geometry = Geometry.from_dict(meta["geometry"]) if "geometry" in meta else None
    return from_module(module, in_channels=meta["in_channels"], classes=meta["classes"],
                       name=path.name, scaling=Scaling.from_dict(meta.get("scaling")),
                       spec=spec, geometry=geometry, card=meta.get("card", {}),
                       patch_size=tuple(patch) if patch else None)


# -- graph files -------------------------------------------------------------------------

def save_exported(path: str | Path, model: Model, example_size: int = 128) -> Path:
    """Save ``model`` as an ExportedProgram (dynamic H/W) with its metadata as an extra file."""
    low = max(model.geometry.receptive_field)
    h, w = torch.export.Dim("h", min=low), torch.export.Dim("w", min=low)
    x = torch.zeros(1, model.in_channels, example_size, example_size)
    shapes = {_forward_arg_names(model.module)[0]: {2: h, 3: w}}
    program = torch.export.export(model.module.eval(), (x,), dynamic_shapes=shapes)
    meta = {"classes": list(model.classes), "in_channels": model.in_channels,
            "scaling": model.scaling.to_dict(), "name": model.name}
    torch.export.save(program, str(path), extra_files={"tilefcn.json": json.dumps(meta)})
    return Path(path)


def _forward_arg_names(module: nn.Module) -> list[str]:
    import inspect

    return [p for p in inspect.signature(module.forward).parameters if p != "self"]


def _load_exported(path: Path, spec: str, geometry: Geometry | None = None) -> Model:
    extra = {"tilefcn.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra["tilefcn.json"]) if extra["tilefcn.json"] else {}
    return from_module(program.module(), in_channels=meta.get("in_channels"), geometry=geometry,
                       classes=meta.get("classes"), name=meta.get("name", path.stem),
                       scaling=Scaling.from_dict(meta.get("scaling")), spec=spec)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def _load_torch_file(path: Path, spec: str, geometry: Geometry | None = None) -> Model:
    names = _zip_names(path)
    if any("/code/" in n for n in names) and any(
            n.endswith("constants.pkl") for n in names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
        return from_module(module, name=path.stem, spec=spec, geometry=geometry)
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return _load_exported(path, spec, geometry)
    raise ModelFileError(
        f"{path} is a pickled PyTorch checkpoint: tilefcn never unpickles model files. In trusted "
        "code, build the module, load its state dict with torch.load(..., weights_only=True), and "
        "save it with tilefcn.save_bundle(...) or torch.export.save(...)")


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
    return from_module(built, name=func_name, spec=spec, geometry=geometry)


def load_model(spec: str | Path | nn.Module | Model, *,
               geometry: Geometry | None = None) -> Model:
    """Load a model from a built-in name, a bundle directory, a ``.pt2`` ExportedProgram,
    a TorchScript file, a ``package.module:function`` factory, or wrap an ``nn.Module``.

    ``geometry``, when already known (workers reloading a model the client measured), skips
    measuring it again; bundles carry theirs in ``model.json``.
    """
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, nn.Module):
        return from_module(spec, geometry=geometry)
    text = str(spec)
    path = Path(text).expanduser()
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
    if text in bundled_names():
        return _load_bundle(BUNDLED_DIR / text, text)
    if ":" in text and not path.suffix and "/" not in text:
        return _load_factory(text, geometry)
    known = ", ".join(bundled_names()) or "none bundled"
    raise ModelFileError(f"no such model: {text!r} (not a file, bundle directory or built-in "
                         f"name; built-in: {known})")
