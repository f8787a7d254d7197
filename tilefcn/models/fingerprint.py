"""What a module computes, as a digest: the cache key of measured geometries and engines.

:func:`state_sha256` covers the weights (the ``sha256`` a heatmap names its model by);
:func:`module_fingerprint` adds each submodule's code, plain attributes and mode.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["module_fingerprint", "state_sha256"]


def state_sha256(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, shapes, raw bytes), order-independent."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        _tensor_digest(digest, name, tensor)
    return digest.hexdigest()


def _tensor_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


@functools.lru_cache(maxsize=512)
def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return cls.__qualname__


def _callable_id(fn, depth: int = 0) -> str:
    """What a function computes, as text: its qualified name, bytecode and constants, and
    (recursively, a few levels) what its closure cells and ``functools.partial`` bind."""
    if isinstance(fn, functools.partial):
        return f"partial({_callable_id(fn.func, depth + 1)},{fn.args!r},{sorted(fn.keywords)!r})"
    fn = getattr(fn, "__func__", fn)
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    if code is None or depth > 3:
        return name
    cells = []
    for cell in fn.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        cells.append(_callable_id(v, depth + 1) if callable(v) and not isinstance(v, nn.Module)
                     else repr(v)[:200] if isinstance(v, (int, float, str, bool, tuple)) else
                     type(v).__qualname__)
    return f"{name}|{code.co_code.hex()}|{code.co_consts!r}|{cells}"


def module_fingerprint(module: nn.Module, state_sha: str | None = None) -> str:
    """sha256 of what ``module`` computes: per submodule its class (qualified name and source
    code, or the generated code of a graph / TorchScript module), what the closures of its
    ``forward`` bind (an activation picked at construction), its plain attributes (numbers,
    strings, tuples: kernel sizes, flags, a scale used in forward; functions stored on it)
    and mode, and every parameter and buffer: the :func:`state_sha256` (pass ``state_sha``
    when it is known) plus the non-persistent buffers."""
    digest = hashlib.sha256()
    for name, m in module.named_modules(remove_duplicate=False):
        cls = type(m)
        code = getattr(m, "code", None) if isinstance(m, (torch.fx.GraphModule,
                                                            torch.jit.ScriptModule)) else None
        digest.update(f"{name}|{cls.__module__}.{cls.__qualname__}|".encode())
        digest.update((code if isinstance(code, str) else _class_source(cls)).encode())
        plain = {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(
            v, (int, float, str, bool, tuple, type(None)))}
        plain.update({k: _callable_id(v) for k, v in vars(m).items() if not k.startswith("_")
                      and callable(v) and not isinstance(v, (nn.Module, type))})
        if code is None and (forward := getattr(cls, "forward", None)) is not None:
            plain["<forward>"] = _callable_id(forward)
        digest.update(repr(sorted(plain.items())).encode())
    digest.update((state_sha or state_sha256(module)).encode())
    for name, m in module.named_modules(remove_duplicate=False):
        for key in sorted(getattr(m, "_non_persistent_buffers_set", ())):
            if (t := m._buffers.get(key)) is not None:
                _tensor_digest(digest, f"{name}.{key}", t)
    return digest.hexdigest()
