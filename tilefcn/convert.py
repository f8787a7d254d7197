"""Patch classifiers → fully convolutional networks; bilinear upsampling heads.

:func:`convolutionalize` is the FCN step "convert the fully connected layers into convolutions"
(Long, Shelhamer & Darrell, 2015): a classifier trained on ``P×P`` patches becomes a network that
slides over an image of any size at the trunk's stride, in one pass.

:func:`bilinear_upsample` is the FCN ``upsample_filt`` transposed convolution, and
:func:`crop_to_input` / :func:`with_bilinear_head` generalise the FCN reference net's
"pad 100, crop 19" arithmetic: the crop is computed from the measured geometry, never by hand.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["Crop2d", "bilinear_upsample", "convolutionalize", "crop_to_input",
           "with_bilinear_head"]

_HEAD_START = (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)
_CONTAINERS = (("features", "classifier"), ("trunk", "head"))
Layers = list[tuple[str, nn.Module]]


def _label(name: str, layer: nn.Module) -> str:
    return f"layer '{name}' ({type(layer).__name__})"


def _check_int(what: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


def _size_pair(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"patch_size must be a positive int or (h, w) pair, got {patch_size!r}")
    return tuple(pair)  # type: ignore[return-value]


def _flat(module: nn.Module, prefix: str) -> Layers:
    """Leaves of (nested) ``nn.Sequential`` containers with dotted names, in call order."""
    if not isinstance(module, nn.Sequential):
        return [(prefix or type(module).__name__, module)]
    out: Layers = []
    for name, child in module.named_children():
        out += _flat(child, f"{prefix}.{name}" if prefix else name)
    return out


def _layers(model: nn.Module) -> Layers:
    """The classifier as one flat list of layers (see :func:`convolutionalize` for layouts)."""
    if isinstance(model, nn.Sequential):
        return _flat(model, "")
    for trunk_name, head_name in _CONTAINERS:
        trunk, head = getattr(model, trunk_name, None), getattr(model, head_name, None)
        if isinstance(trunk, nn.Module) and isinstance(head, nn.Module):
            layers = _flat(trunk, trunk_name)
            head_layers = _flat(head, head_name)
            if trunk_name == "features":  # torchvision: classifier(flatten(avgpool(features(x))))
                if isinstance(getattr(model, "avgpool", None), nn.Module):
                    layers.append(("avgpool", model.avgpool))
                if not any(isinstance(m, nn.Flatten) for _, m in head_layers):
                    layers.append(("flatten", nn.Flatten()))
            return layers + head_layers
    raise TypeError(f"cannot read the layers of {type(model).__name__}: pass an nn.Sequential "
                    "or a module with .features/.classifier or .trunk/.head")


def _meta_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` on the ``meta`` device: shapes only, no compute, module untouched."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return functional_call(module, {k: v.to("meta") for k, v in tensors.items()}, (x,))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _in_channels(trunk: Layers) -> int:
    for _, layer in trunk:
        for sub in layer.modules():
            if isinstance(sub, nn.Conv2d):
                return sub.in_channels
    raise ValueError("no Conv2d in the trunk to read the input channels from: pass in_channels=")


def _adaptive_pool(name: str, layer: nn.Module, hw: tuple[int, int]):
    """Adaptive pool at patch size → (replacement layers, output (h, w)).

    Per axis: output size == trunk size → identity (kernel 1); output size 1 → global (kernel =
    trunk size); anything else depends on the image size and is refused.
    """
    size = layer.output_size
    size = (size, size) if isinstance(size, int) else tuple(n if o is None else o
                                                           for o, n in zip(size, hw, strict=True))
    kernel = []
    for out, n in zip(size, hw, strict=True):
        if out not in (1, n):
            raise ValueError(
                f"{_label(name, layer)}: output_size {size} is neither global (1) nor an identity "
                f"at this patch size (trunk output {hw}); choose a patch size whose trunk output "
                f"is {size}, or use global pooling"
            )
        kernel.append(1 if out == n else n)
    if kernel == [1, 1]:
        return [], size
    if getattr(layer, "return_indices", False):
        raise ValueError(f"{_label(name, layer)}: return_indices=True is not supported")
    pool = nn.AvgPool2d if isinstance(layer, nn.AdaptiveAvgPool2d) else nn.MaxPool2d
    return [pool(tuple(kernel), stride=1)], size


def _linear_to_conv(lin: nn.Linear, channels: int, kernel: tuple[int, int]) -> nn.Conv2d:
    """``Linear(C*h*w, n)`` after a C-major flatten → ``Conv2d(C, n, (h, w))``, same weights."""
    conv = nn.Conv2d(channels, lin.out_features, kernel, bias=lin.bias is not None,
                     device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.reshape(conv.weight.shape))
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
    return conv.train(lin.training)


def convolutionalize(classifier: nn.Module, patch_size: int | tuple[int, int], *,
                     in_channels: int | None = None) -> nn.Sequential:
    """Turn a patch classifier into the equivalent fully convolutional ``nn.Sequential``.

    Layouts: an ``nn.Sequential`` (nested Sequentials are flattened), a module with
    ``.trunk``/``.head`` (``head(trunk(x))``) or a torchvision-like ``.features``/``[.avgpool]``/
    ``.classifier`` (``classifier(flatten(avgpool(features(x))))``). The trunk is everything before
    the first Flatten/Linear/adaptive pool; with ``(C, h, w)`` its output at ``patch_size``:

    - ``Flatten → [Dropout/activations] → Linear(C*h*w, n)`` becomes ``Conv2d(C, n, (h, w))`` with
      weight ``W.view(n, C, h, w)`` (Flatten is C-major); later Linears become 1×1 convs;
      elementwise layers are kept, ``Softmax``/``LogSoftmax`` act on dim 1.
    - ``AdaptiveAvgPool2d(1)`` → ``AvgPool2d((h, w), stride=1)`` (max likewise); an adaptive pool
      whose output size already is ``(h, w)`` is an identity at patch size and is dropped.

    On an image of ``H`` rows the result gives ``floor((H - P) / s) + 1`` outputs, ``s`` = product
    of the trunk strides, when every patch row is used (a ``P`` whose rows the trunk's floor-mode
    pooling drops yields extra trailing outputs, exact but for those dropped rows). Output
    ``(i, j)`` equals ``classifier(image[:, :, s*i : s*i + P, s*j : s*j + P])`` exactly for an
    unpadded trunk. A padded trunk sees real neighbouring pixels where the classifier saw its zero
    padding, so only the patch-size output matches exactly (interior windows approximately).

    The classifier is not modified; weights are copied, dtype/device and train/eval modes kept.
    Raises ``ValueError`` naming the layer for any other layout or a too small patch.
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    size = _size_pair(patch_size)
    layers = _layers(classifier)
    cut = next((k for k, (_, m) in enumerate(layers) if isinstance(m, _HEAD_START)), None)
    if cut is None:
        raise ValueError("no Flatten, Linear or adaptive pooling head in "
                         f"{type(classifier).__name__}: it is already fully convolutional")
    trunk, head = layers[:cut], layers[cut:]
    in_ch = _in_channels(trunk) if in_channels is None else in_channels
    x = torch.zeros((1, in_ch, *size), device="meta", dtype=_dtype(classifier))
    for name, layer in trunk:
        try:
            y = _meta_call(layer, x)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
            raise ValueError(f"{_label(name, layer)} fails on a {tuple(x.shape)} input at patch "
                             f"size {size} (patch too small?): {err}") from err
        if y.dim() != 4 or y.numel() == 0:
            raise ValueError(f"{_label(name, layer)} turns {tuple(x.shape)} into {tuple(y.shape)}"
                             f" at patch size {size}: patch too small or not a 2-D trunk")
        x = y
    channels, hw = x.shape[1], (x.shape[2], x.shape[3])
    out = copy.deepcopy([m for _, m in trunk])  # one deepcopy keeps weights tied within it
    flat, linear_seen = False, False
    for name, layer in head:
        if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and not flat:
            pools, hw = _adaptive_pool(name, layer, hw)
            out += pools
        elif isinstance(layer, nn.Flatten) and not flat:
            if (layer.start_dim, layer.end_dim) not in ((1, -1), (1, 3), (-3, -1)):
                raise ValueError(f"{_label(name, layer)}: only Flatten(1, -1) is supported")
            flat = True
        elif isinstance(layer, nn.Linear):
            if not flat:
                raise ValueError(f"{_label(name, layer)} is not preceded by a Flatten")
            kernel = (1, 1) if linear_seen else hw
            if layer.in_features != channels * kernel[0] * kernel[1]:
                raise ValueError(f"{_label(name, layer)} expects {layer.in_features} inputs but "
                                 f"gets {channels}×{kernel[0]}×{kernel[1]} at patch size {size}")
            out.append(_linear_to_conv(layer, channels, kernel))
            channels, hw, linear_seen = layer.out_features, (1, 1), True
        elif (isinstance(layer, nn.Conv2d) and not flat and hw == (1, 1)
              and layer.kernel_size == layer.stride == (1, 1)
              and layer.padding in ((0, 0), "valid")):
            out.append(copy.deepcopy(layer))
            channels = layer.out_channels
        elif isinstance(layer, (nn.Softmax, nn.LogSoftmax)) and layer.dim in (
                (None, 1, -1) if flat else (None, 1, -3)):
            out.append(type(layer)(dim=1).train(layer.training))
        elif isinstance(layer, _ELEMENTWISE):
            out.append(copy.deepcopy(layer))
        else:
            raise ValueError(f"{_label(name, layer)} is not supported in a classifier head "
                             "(after the trunk only Flatten, Linear, adaptive pooling, 1×1 convs "
                             "after global pooling, dropout and elementwise activations are)")
    if flat and hw != (1, 1):
        raise ValueError(f"the Flatten in {type(classifier).__name__} is not followed by a Linear")
    net = nn.Sequential(*out)
    net.training = classifier.training
    if not isinstance(classifier, nn.Sequential):  # its forward() is assumed: check the shape
        probe = torch.zeros((1, in_ch, *size), device="meta", dtype=x.dtype)
        want, got = _meta_call(classifier, probe), _meta_call(net, probe)
        if want.shape[0] != 1 or want.numel() != got.numel():
            raise ValueError(f"{type(classifier).__name__} gives {tuple(want.shape)} but its "
                             f"layers in order give {tuple(got.shape)}: its forward() is not "
                             "the assumed sequence; pass an nn.Sequential")
    return net


def bilinear_upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Depthwise ``ConvTranspose2d`` initialised to bilinear upsampling by ``factor`` (FCN).

    Kernel ``k = 2*factor - factor % 2``, stride ``factor``, padding 0, ``groups=channels``, no
    bias; weight ``(channels, 1, k, k)`` = ``outer(f, f)``, ``f[t] = 1 - |t - c| / factor`` with
    kernel centre ``c = (k - 1)/2`` (``factor - 1`` for odd, ``factor - 1/2`` for even factors).

    On ``n`` inputs it gives ``(n + 1)*factor - factor % 2`` outputs; output ``j`` is the linear
    interpolation of the input at source coordinate ``(j - c) / factor``, where
    ``c = (factor - 1)/2 + factor // 2``. Hence, with ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` (source ``(j + 1/2)/factor - 1/2``), the shift is ``factor // 2``::

        up(x)[..., j + factor // 2] == interpolate(x)[..., j]   where (j + 1/2)/factor - 1/2
                                                               lies in [0, n - 1]

    Near the borders ``interpolate`` clamps while ``up`` fades towards zero. There is no padding:
    align the output with :func:`crop_to_input`. The weight is trainable (an initialisation);
    call ``.requires_grad_(False)`` for a fixed interpolation.
    """
    _check_int("channels", channels, 1)
    _check_int("factor", factor, 1)
    k = 2 * factor - factor % 2
    f = 1 - (torch.arange(k, dtype=torch.float64) - (k - 1) / 2).abs() / factor
    up = nn.ConvTranspose2d(channels, channels, k, stride=factor, padding=0, groups=channels,
                            bias=False)
    with torch.no_grad():
        up.weight.copy_(torch.outer(f, f).expand(channels, 1, k, k))
    return up


class Crop2d(nn.Module):
    """Drop ``top`` rows and ``left`` columns from the start: ``x[:, :, top:, left:]``."""

    def __init__(self, top: int, left: int) -> None:
        super().__init__()
        _check_int("Crop2d top", top, 0)
        _check_int("Crop2d left", left, 0)
        self.top, self.left = top, left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, self.top:, self.left:]

    def extra_repr(self) -> str:
        return f"top={self.top}, left={self.left}"


def crop_to_input(net: nn.Module, in_channels: int = 3) -> tuple[int, int]:
    """Leading ``(rows, cols)`` to crop from a stride-1 net so output ``j`` sits on input ``j``.

    With ``g = measure_geometry(net)``, output ``j`` depends on input ``[o + j, o + j + r)``,
    centred on input ``j + o + (r - 1)/2``; the crop is ``floor(-(o + (r - 1)/2))``. After it,
    output ``j`` is centred on input ``j`` (``2o + r`` odd) or ``j - 1/2`` (``2o + r`` even).
    For a trunk of stride ``s`` (offset ``o_t``, field ``r_t``) + :func:`bilinear_upsample` by
    ``s`` this is ``(k - 1)/2 - o_t - (r_t - 1)/2`` rounded down, ``k`` the kernel size (the
    measured cover of all phases has the same centre): 19 for the FCN-32s VGG16 (pad 100).
    A negative value ``-p`` means output 0 is centred ``p`` pixels inside the input: the input
    needs ``p`` more rows of padding (what FCN's pad 100 is for).
    """
    from tilefcn.measure import measure_geometry

    g = measure_geometry(net, in_channels=in_channels)
    if g.stride != (1, 1):
        raise ValueError(f"crop_to_input needs a stride-1 network, got stride {g.stride}: "
                         "upsample by the trunk stride first")
    return tuple((-c) // 2 for c in g.centre2)


def with_bilinear_head(trunk: nn.Module, in_channels: int = 3) -> nn.Sequential:
    """``trunk`` → :func:`bilinear_upsample` by its stride (fixed) → :class:`Crop2d`, aligned.

    The stride (square) is measured, the crop computed by :func:`crop_to_input`; where the crop
    is negative, an ``nn.ZeroPad2d`` of that size goes in front (top/left only) and the crop is 0.
    Output ``j`` is then centred on input ``j`` (or ``j - 1/2``, see :func:`crop_to_input`);
    trailing rows are not trimmed. The trunk is used as is, not copied.
    """
    from tilefcn.measure import measure_geometry

    g = measure_geometry(trunk, in_channels=in_channels)
    if g.stride[0] != g.stride[1]:
        raise ValueError(f"with_bilinear_head needs a square stride, got {g.stride}")
    probe = torch.zeros((1, in_channels, *g.receptive_field), device="meta", dtype=_dtype(trunk))
    param = next(iter(trunk.parameters()), None)
    up = bilinear_upsample(_meta_call(trunk, probe).shape[1], g.stride[0]).requires_grad_(False)
    if param is not None:
        up = up.to(device=param.device, dtype=_dtype(trunk))
    top, left = crop_to_input(nn.Sequential(trunk, up), in_channels)
    layers = [trunk, up, Crop2d(max(top, 0), max(left, 0))]
    if min(top, left) < 0:
        layers.insert(0, nn.ZeroPad2d((max(-left, 0), 0, max(-top, 0), 0)))
    return nn.Sequential(*layers)
