"""An adversarial model zoo for the tiling contract (issue "[models]").

Every entry is data: ``Entry(id, build, in_channels, expected, match)``.

* ``expected == "exact"``: the model is local and translation-equivariant (finite receptive
  field, any border handling done by the network itself), so ``tilefcn.predict`` MUST equal the
  model run on the whole image (same shape, max abs error <= 1e-5). Refusing it is a failure.
* ``expected == "refuse"``: the model is non-local or not translation-equivariant, so
  ``tilefcn.predict`` MUST raise ``ValueError`` (one line) before any compute, and the message
  must contain one of ``match`` (case-insensitive: the op or the layer).
* ``expected == "either"``: arguably equivariant but only through shape arithmetic a proof
  cannot be expected to follow; refusing is fine, but an accepted model must be exact.

``entry.make()`` builds the module in eval mode (except the layers an entry deliberately leaves
in train mode) with weights seeded from the entry id, and non-trivial BatchNorm statistics.
Many pairs are deliberate: the same op over channels (local) and over space (non-local),
a flip/transpose that is undone (equivariant) and one that is not.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- helpers


class Op(nn.Module):
    """A parameter-free op given as a (module-level, picklable) function."""

    def __init__(self, fn: Callable, label: str | None = None):
        super().__init__()
        self.fn = fn
        self.label = label or getattr(fn, "__name__", "op")

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


def conv(cin: int, cout: int, k=3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, **kw)


def same(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    d = kw.get("dilation", 1)
    return nn.Conv2d(cin, cout, k, padding=d * (k - 1) // 2, **kw)


def seq(*layers, **named) -> nn.Sequential:
    if named:
        from collections import OrderedDict

        return nn.Sequential(OrderedDict(named))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------- parameter-free ops


def roll_spatial(x):
    return torch.roll(x, shifts=(3, -5), dims=(2, 3))


def roll_channels(x):
    return torch.roll(x, shifts=1, dims=1)


def half_width(x):
    return x[..., : x.shape[-1] // 2]


def bottom_half(x):
    return x[..., x.shape[-2] // 2:, :]


def fixed_window(x):
    return x[..., :48, :48]


def crop_2_3(x):  # a constant 2 rows off the top, 3 off the bottom: equivariant
    return x[..., 2: x.shape[-2] - 3, :]


def crop_negative(x):
    return x[..., 1:-1, 3:-2]


def narrow_const(x):
    return x.narrow(2, 1, x.shape[2] - 2)


def crop_to_multiple(x, *, f):  # constant start, end from shape: equivariant
    return x[..., : x.shape[-2] // f * f, : x.shape[-1] // f * f]


def subsample(x):
    return x[..., ::2, ::2]


def subsample_phase(x):
    return x[..., 1::2, 1::2]


def flip_spatial(x):
    return torch.flip(x, dims=(3,))


def flip_channels(x):
    return torch.flip(x, dims=(1,))


def transpose_hw(x):
    return x.transpose(2, 3)


def rot90(x):
    return torch.rot90(x, 1, dims=(2, 3))


def spatial_center(x):
    return x - x.mean(dim=(2, 3), keepdim=True)


def channel_center(x):
    return x - x.mean(dim=1, keepdim=True)


def layer_norm_hw(x):
    return F.layer_norm(x, x.shape[-2:])


def normalize_dim1(x):
    return F.normalize(x, dim=1)


def normalize_dim2(x):
    return F.normalize(x, dim=2)


def dropout_always(x):
    return F.dropout(x, 0.5, training=True)


def circular_pad(x):
    return F.pad(x, (2, 2, 2, 2), mode="circular")


def resize_fixed(x):
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def up_align_corners(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def add_row_index(x):
    rows = torch.arange(x.shape[-2], dtype=x.dtype, device=x.device)
    return x + rows[:, None] / 100


def coordconv(x):
    n, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
    return torch.cat([x, yy.expand(n, 1, h, w), xx.expand(n, 1, h, w)], 1)


def softmax_spatial(x):
    return F.softmax(x.flatten(2), dim=-1).view_as(x) * 100


def max_normalize(x):
    return x / (x.abs().amax() + 1e-3)


def std_normalize(x):
    return x / (x.std() + 1e-3)


def cumsum_w(x):
    return torch.cumsum(x, dim=-1) / 10


def sort_spatial(x):
    return x.flatten(2).sort(dim=-1).values.view_as(x)


def fft_abs(x):
    return torch.fft.fft2(x).abs() / 100


def width_scaled(x):
    return x * (x.shape[-1] / 100.0)


def size_branch(x):
    return x * 2 if x.shape[-2] > 100 else x


def value_branch(x):
    return x * 2 if x.mean() > 0.5 else -x


def sum_over_width(x):
    return x - x.sum(dim=-1, keepdim=True) / 50


def ones_channel(x):
    return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def const_channel_from_shape(x):
    return torch.cat([x, x.new_full((x.shape[0], 1, x.shape[2], x.shape[3]), 0.5)], 1)


def where_leaky(x):
    return torch.where(x > 0, x, 0.1 * x).clamp(-2, 2)


def interp(x, *, scale, mode, antialias=False):
    kw = {} if mode.startswith("nearest") else {"align_corners": False}
    return F.interpolate(x, scale_factor=scale, mode=mode, antialias=antialias, **kw)


def pad(x, *, p, mode="constant", value=0.0):
    if mode == "constant":
        return F.pad(x, p, mode=mode, value=value)
    return F.pad(x, p, mode=mode)


def op(fn, label=None, **kw) -> Op:
    return Op(functools.partial(fn, **kw) if kw else fn, label or fn.__name__)


# ----------------------------------------------------------------- building blocks


class Residual(nn.Module):
    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.conv1 = same(c, c, 3, dilation=dilation)
        self.conv2 = same(c, c, 3)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class Dense(nn.Module):
    def __init__(self, c: int, growth: int = 3, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(same(c + i * growth, growth) for i in range(layers))
        self.out_channels = c + layers * growth

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, F.relu(layer(x))], 1)
        return x


def _up(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "nearest":
        return seq(nn.Upsample(scale_factor=2, mode="nearest"), conv(cin, cout, 1))
    if kind == "bilinear":
        return seq(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   conv(cin, cout, 1))
    if kind == "convT":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)
    if kind == "shuffle":
        return seq(conv(cin, 4 * cout, 1), nn.PixelShuffle(2))
    raise ValueError(kind)


class UNet(nn.Module):
    """U-Net with concatenated skips.

    ``padded``: 'same' convs; the skip is cropped to the up-sampled size from the top-left
    (odd sizes drop their last row/column: a constant crop start, so equivariant).
    ``padded=False``: valid convs as in the original U-Net; the skip is cropped by a
    CONSTANT amount ``crops[l]`` (the smallest centre crop over all size residues).
    ``fix="pad"``: instead pad the up-sampled map to the skip's size (milesial's
    Pytorch-UNet); the pad amount depends on the parity of the size.
    """

    def __init__(self, c: int, depth: int, up: str = "nearest", padded: bool = True,
                 classes: int = 2, convs: int = 1, fix: str = "crop"):
        super().__init__()
        p = 1 if padded else 0
        self.depth, self.padded, self.fix = depth, padded, fix
        widths = [4 + 2 * i for i in range(depth + 1)]

        def block(cin, cout):
            layers = [conv(cin, cout, 3, padding=p), nn.ReLU()]
            for _ in range(convs - 1):
                layers += [conv(cout, cout, 3, padding=p), nn.ReLU()]
            return seq(*layers)

        self.enc = nn.ModuleList()
        cin = c
        for w in widths:
            self.enc.append(block(cin, w))
            cin = w
        self.ups = nn.ModuleList(_up(up, widths[i + 1], widths[i]) for i in range(depth))
        self.dec = nn.ModuleList(block(2 * widths[i], widths[i]) for i in range(depth))
        self.head = conv(widths[0], classes, 1)
        self.crops = [0] * depth
        if not padded:
            self._record = {}
            with torch.no_grad():
                for h in range(96, 96 + 2 ** depth):
                    self(torch.zeros(1, c, h, h))
            self.crops = [min(v) // 2 for _, v in sorted(self._record.items())]
            del self._record

    def forward(self, x):
        skips = []
        x = self.enc[0](x)
        for level in range(1, self.depth + 1):
            skips.append(x)
            x = self.enc[level](F.max_pool2d(x, 2))
        for level in reversed(range(self.depth)):
            u = self.ups[level](x)
            s = skips[level]
            if hasattr(self, "_record"):
                self._record.setdefault(level, []).append(s.shape[-1] - u.shape[-1])
                c = 0
            else:
                c = self.crops[level]
            if self.fix == "pad":
                dy, dx = s.shape[-2] - u.shape[-2], s.shape[-1] - u.shape[-1]
                u = F.pad(u, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
            else:
                s = s[..., c: c + u.shape[-2], c: c + u.shape[-1]]
            x = self.dec[level](torch.cat([s, u], 1))
        return self.head(x)


class SegNet(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.enc1 = seq(same(c, 6), nn.BatchNorm2d(6), nn.ReLU())
        self.enc2 = seq(same(6, 8), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec2 = seq(same(8, 6), nn.ReLU())
        self.dec1 = same(6, classes)

    def forward(self, x):
        a = self.enc1(x)
        pa, ia = self.pool(a)
        b = self.enc2(pa)
        pb, ib = self.pool(b)
        b = self.unpool(pb, ib, output_size=b.shape[-2:])
        b = self.dec2(b)
        a = self.unpool(b, ia, output_size=a.shape[-2:])
        return self.dec1(a)


class SegNetOverlap(nn.Module):
    """Overlapping 3x3/stride-2 pooling with indices, unpooled to the pre-pool size."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.enc = seq(same(c, 6), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, padding=1, return_indices=True)
        self.mid = seq(same(6, 6), nn.ReLU())
        self.unpool = nn.MaxUnpool2d(3, 2, padding=1)
        self.dec = same(6, classes)

    def forward(self, x):
        a = self.enc(x)
        p, i = self.pool(a)
        return self.dec(self.unpool(self.mid(p), i, output_size=a.shape[-2:]))


class HeadFirst(nn.Module):
    """The head is registered before the stem: the first Conv2d in registration order has
    8 input channels, the image has ``c``."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.head = conv(8, classes, 1)
        self.body = same(8, 8, 3)
        self.stem = same(c, 8, 3)

    def forward(self, x):
        return self.head(F.relu(self.body(F.relu(self.stem(x)))))


class DeadBranch(nn.Module):
    """A far-reaching branch behind a ReLU that is dead almost everywhere: a probe with small
    perturbations sees receptive field 3, the real one is 3 + 16."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.near = same(c, classes, 3)
        self.gate = conv(c, 4, 1)
        self.far = conv(4, classes, 5, padding=8, dilation=4)
        with torch.no_grad():
            self.gate.weight.fill_(1.0)
            self.gate.bias.fill_(-0.8 * c - 0.2)
            self.far.weight.mul_(5)

    def forward(self, x):
        return self.near(x) + self.far(F.relu(self.gate(x)))


class Normalized(nn.Module):
    """Per-channel (x - mean) / std from buffers, then a conv: no Conv2d first."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.register_buffer("mean", torch.rand(1, c, 1, 1))
        self.register_buffer("std", torch.rand(1, c, 1, 1) + 0.5)
        self.net = seq(same(c, 6, 5), nn.ReLU(), same(6, classes))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class Einsum1x1(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 6)
        self.w = nn.Parameter(torch.randn(classes, 6) * 0.4)

    def forward(self, x):
        return torch.einsum("nchw,kc->nkhw", torch.tanh(self.stem(x)), self.w)


class MatmulChannelsLast(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 6)
        self.w = nn.Parameter(torch.randn(6, classes) * 0.4)

    def forward(self, x):
        return (F.relu(self.stem(x)).permute(0, 2, 3, 1) @ self.w).permute(0, 3, 1, 2)


class SpatialAttentionCBAM(nn.Module):
    """CBAM's spatial attention: channel mean/max -> 7x7 conv -> sigmoid gate (local)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 6)
        self.gate = same(2, 1, 7)
        self.head = conv(6, classes, 1)

    def forward(self, x):
        f = F.relu(self.stem(x))
        a = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)
        return self.head(f * torch.sigmoid(self.gate(a)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 8)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excite = seq(conv(8, 4, 1), nn.ReLU(), conv(4, 8, 1), nn.Sigmoid())
        self.head = conv(8, classes, 1)

    def forward(self, x):
        f = F.relu(self.stem(x))
        return self.head(f * self.excite(self.squeeze(f)))


class LocalAttention(nn.Module):
    """3x3 neighbourhood attention via F.unfold and reshapes from x.shape (local)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.q, self.k, self.v = conv(c, 4, 1), conv(c, 4, 1), conv(c, 4, 1)
        self.head = conv(4, classes, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        q = self.q(x)
        k = F.unfold(self.k(x), 3, padding=1).view(n, 4, 9, h, w)
        v = F.unfold(self.v(x), 3, padding=1).view(n, 4, 9, h, w)
        a = F.softmax((q.unsqueeze(2) * k).sum(1), dim=1)
        return self.head((v * a.unsqueeze(1)).sum(2))


class UnfoldMedian(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 4)
        self.head = same(4, classes)

    def forward(self, x):
        f = self.stem(x)
        n, c, h, w = f.shape
        f = F.unfold(f, 3, padding=1).view(n, c, 9, h, w).median(dim=2).values
        return self.head(f)


class ChannelShuffle(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 8, groups=2 if c % 2 == 0 else 1)
        self.mix = same(8, 8, groups=2)
        self.head = conv(8, classes, 1)

    def forward(self, x):
        f = F.relu(self.stem(x))
        n, c, h, w = f.shape
        f = f.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(F.relu(self.mix(f)))


class GroupSum(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 8)
        self.head = same(4, classes)

    def forward(self, x):
        f = self.stem(x)
        n, c, h, w = f.shape
        return self.head(f.view(n, c // 2, 2, h, w).sum(2))


class FlipConvFlip(nn.Module):
    """flip -> symmetric conv -> flip back: a conv with a flipped kernel (equivariant)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.inner = same(c, 6, 5)
        self.head = same(6, classes)

    def forward(self, x):
        f = torch.flip(self.inner(torch.flip(x, dims=(2, 3))), dims=(2, 3))
        return self.head(F.relu(f))


class TransposeConvTranspose(nn.Module):
    """H<->W swap, anisotropic conv, swap back: a conv with a transposed kernel."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.inner = conv(c, 6, (3, 5), padding=(1, 2))
        self.head = same(6, classes)

    def forward(self, x):
        return self.head(F.relu(self.inner(x.transpose(2, 3)).transpose(2, 3)))


class RollConvUnroll(nn.Module):
    """roll -> conv -> roll back: wraps the top rows around to the bottom (non-local)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.inner = same(c, classes, 3)

    def forward(self, x):
        return torch.roll(self.inner(torch.roll(x, 3, dims=2)), -3, dims=2)


class MultiScaleSum(nn.Module):
    """FPN-like: strides 1, 2, 4 up-sampled (nearest) and summed, cropped to the stride-1 map."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.s1 = same(c, 6)
        self.s2 = same(6, 6, stride=2)
        self.s4 = same(6, 6, stride=2)
        self.head = conv(6, classes, 1)

    def forward(self, x):
        a = F.relu(self.s1(x))
        b = F.relu(self.s2(a))
        c = F.relu(self.s4(b))
        b = b + F.interpolate(c, scale_factor=2, mode="nearest")[..., : b.shape[-2], : b.shape[-1]]
        a = a + F.interpolate(b, scale_factor=2, mode="nearest")[..., : a.shape[-2], : a.shape[-1]]
        return self.head(a)


class LayerNormChannelsLast(nn.Module):
    """LayerNorm over channels on a channels-last permutation: per pixel, local."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 8)
        self.norm = nn.LayerNorm(8)
        self.head = same(8, classes)

    def forward(self, x):
        f = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(F.gelu(f))


class PixelAttention(nn.Module):
    """nn.MultiheadAttention over the flattened pixels (global)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = seq(same(c, 8), nn.MaxPool2d(4))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = conv(8, classes, 1)

    def forward(self, x):
        f = self.stem(x)
        n, c, h, w = f.shape
        t = f.flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        return self.head(a.transpose(1, 2).reshape(n, c, h, w))


class NonLocalBlock(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.theta, self.phi, self.g = conv(c, 4, 1), conv(c, 4, 1), conv(c, 4, 1)
        self.head = conv(4, classes, 1)

    def forward(self, x):
        x = F.max_pool2d(x, 4)
        n, _, h, w = x.shape
        t = self.theta(x).flatten(2)
        p = self.phi(x).flatten(2)
        a = torch.softmax(torch.bmm(t.transpose(1, 2), p), dim=-1)
        y = torch.bmm(self.g(x).flatten(2), a.transpose(1, 2)).view(n, 4, h, w)
        return self.head(y)


class PosEmbed(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, c, 8, 8))
        self.net = seq(same(c, 6), nn.ReLU(), conv(6, classes, 1))

    def forward(self, x):
        return self.net(x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear",
                                          align_corners=False))


class AddGlobalContext(nn.Module):
    def __init__(self):
        super().__init__()
        self.context = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return x + self.context(x)


class GlobalContextUNet(nn.Module):
    """A depth-2 U-Net whose bottleneck adds its own global average (PSP-like, non-local)."""

    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.unet = UNet(c, 2, "nearest", classes=classes)
        self.unet.enc[2] = seq(self.unet.enc[2], AddGlobalContext())

    def forward(self, x):
        return self.unet(x)


class DeepTrainBN(nn.Module):
    def __init__(self, c: int, classes: int = 2):
        super().__init__()
        self.stem = same(c, 6)
        self.deep = seq(block=seq(same(6, 6), nn.BatchNorm2d(6), nn.ReLU()))
        self.head = conv(6, classes, 1)

    def forward(self, x):
        return self.head(self.deep(F.relu(self.stem(x))))


# --------------------------------------------------------------------------- factories


def _finish(model: nn.Module, train: tuple[str, ...]) -> nn.Module:
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    for name in train:
        model.get_submodule(name).train()
    return model


def _make(entry_id: str, fn: Callable[[int], nn.Module], train: tuple[str, ...],
          c: int) -> nn.Module:
    torch.manual_seed(zlib.crc32(entry_id.encode()))
    return _finish(fn(c), train)


@dataclass(frozen=True)
class Entry:
    id: str
    build: Callable[[int], nn.Module]
    in_channels: int
    expected: str  # "exact" | "refuse" | "either"
    match: tuple[str, ...] = ()
    sizes: tuple[tuple[int, int], ...] | None = None  # image sizes, when not the default

    def make(self) -> nn.Module:
        return self.build(self.in_channels)


ZOO: list[Entry] = []


def add(entry_id: str, fn: Callable[[int], nn.Module], c: int, expected: str = "exact",
        match: tuple[str, ...] | str = (), train: tuple[str, ...] = (),
        sizes: tuple[tuple[int, int], ...] | None = None) -> None:
    assert expected in ("exact", "refuse", "either")
    assert all(e.id != entry_id for e in ZOO), entry_id
    match = (match,) if isinstance(match, str) else tuple(match)
    assert (expected == "refuse") == bool(match), entry_id
    ZOO.append(Entry(entry_id, functools.partial(_make, entry_id, fn, train), c, expected,
                     match, sizes))


def trunk(c: int, *layers) -> nn.Sequential:
    """``same(c, 6)`` + ReLU, then ``layers``."""
    return seq(same(c, 6), nn.ReLU(), *layers)


# ------------------------------------------------------------------------- U-Nets etc.

add("unet_d1_nearest_same", lambda c: UNet(c, 1, "nearest"), 3)
add("unet_d2_bilinear_same", lambda c: UNet(c, 2, "bilinear"), 1)
add("unet_d3_convT_same", lambda c: UNet(c, 3, "convT"), 4)
add("unet_d2_shuffle_same", lambda c: UNet(c, 2, "shuffle"), 8)
add("unet_d3_nearest_same_2conv", lambda c: UNet(c, 3, "nearest", convs=2), 2)
add("unet_d1_convT_valid", lambda c: UNet(c, 1, "convT", padded=False, convs=2), 3)
add("unet_d2_nearest_valid", lambda c: UNet(c, 2, "nearest", padded=False), 2)
add("unet_d2_bilinear_valid", lambda c: UNet(c, 2, "bilinear", padded=False), 13)
add("unet_d3_convT_valid", lambda c: UNet(c, 3, "convT", padded=False), 1)
add("unet_d3_bilinear_valid", lambda c: UNet(c, 3, "bilinear", padded=False), 3)
add("unet_d2_pad_to_skip_milesial", lambda c: UNet(c, 2, "bilinear", fix="pad"), 3, "either")
add("residual_blocks", lambda c: seq(same(c, 6), Residual(6), nn.ReLU(), Residual(6, 2),
                                     nn.ReLU(), conv(6, 2, 1)), 3)
add("residual_strided", lambda c: seq(same(c, 6, stride=2), Residual(6), nn.MaxPool2d(2),
                                      Residual(6, 3), conv(6, 3, 1)), 4)
add("dense_block", lambda c: seq(same(c, 4), Dense(4), nn.ReLU(), conv(13, 2, 1)), 2)
add("dense_then_pool", lambda c: seq(Dense(c, 2, 2), nn.AvgPool2d(2), same(c + 4, 2)), 13)
add("segnet_unpool_output_size", lambda c: SegNet(c), 3)
add("segnet_unpool_k3s2p1", lambda c: SegNetOverlap(c), 1)
add("multiscale_fpn_sum", lambda c: MultiScaleSum(c), 3)

# ------------------------------------------------------------ shuffles / groups / strides

EVEN = functools.partial(op, crop_to_multiple, "even", f=2)
SIZES_2 = ((68, 94), (128, 128), (150, 202))  # the whole-image model needs multiples of 2
SIZES_4 = ((68, 92), (128, 128), (148, 200))
add("pixel_unshuffle_stem", lambda c: seq(nn.PixelUnshuffle(2), same(4 * c, 6), nn.ReLU(),
                                          same(6, 2)), 1, sizes=SIZES_2)
add("pixel_unshuffle4_stem_13", lambda c: seq(nn.PixelUnshuffle(4), conv(16 * c, 8, 1),
                                              nn.ReLU(), same(8, 2)), 13, sizes=SIZES_4)
add("crop_to_even_then_unshuffle", lambda c: seq(EVEN(), nn.PixelUnshuffle(2), same(4 * c, 6),
                                                 nn.ReLU(), same(6, 2)), 3)
add("pixel_shuffle_head", lambda c: trunk(c, same(6, 6, stride=2), nn.ReLU(), conv(6, 8, 1),
                                          nn.PixelShuffle(2)), 3)
add("unshuffle_shuffle", lambda c: seq(nn.PixelUnshuffle(2), same(4 * c, 8), nn.ReLU(),
                                       same(8, 8), nn.PixelShuffle(2), same(2, 2)), 2,
    sizes=SIZES_2)
add("depthwise_separable", lambda c: seq(same(c, c, 5, groups=c), conv(c, 8, 1), nn.ReLU(),
                                         same(8, 8, groups=8), conv(8, 2, 1)), 8)
add("grouped_conv", lambda c: seq(same(c, 8, groups=2), nn.ReLU(), same(8, 8, groups=4),
                                  nn.ReLU(), conv(8, 2, 1)), 4)
add("dilated_large_rf", lambda c: seq(same(c, 4, dilation=1), nn.ReLU(),
                                      same(4, 4, dilation=4), nn.ReLU(),
                                      same(4, 4, dilation=16), nn.ReLU(),
                                      conv(4, 2, 5, dilation=8)), 1)  # rf 1+2+8+32+32=75
add("strided_odd_kernels", lambda c: seq(conv(c, 6, 5, stride=3, padding=2), nn.ReLU(),
                                         conv(6, 6, 7, stride=2, padding=3), nn.Tanh(),
                                         conv(6, 2, 3)), 3)  # stride 6
add("anisotropic_stride", lambda c: seq(conv(c, 6, (3, 5), stride=(2, 3), padding=(1, 2)),
                                        nn.ReLU(), conv(6, 2, (1, 3))), 2)
add("conv_same_even_kernel", lambda c: seq(conv(c, 6, 4, padding="same"), nn.ReLU(),
                                           conv(6, 2, 3, padding="same", dilation=2)), 2)
add("ceil_mode_maxpool", lambda c: trunk(c, nn.MaxPool2d(2, ceil_mode=True), same(6, 6),
                                         nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                         conv(6, 2, 1)), 3)
add("maxpool_padded_dilated", lambda c: trunk(c, nn.MaxPool2d(3, 2, padding=1, dilation=2),
                                              conv(6, 2, 3)), 2)
add("avgpool_count_include_pad", lambda c: trunk(c, nn.AvgPool2d(3, 2, padding=1,
                                                                 count_include_pad=True),
                                                 conv(6, 2, 1)), 4)
add("avgpool_exclude_pad", lambda c: trunk(c, nn.AvgPool2d(3, 2, padding=1,
                                                           count_include_pad=False),
                                           conv(6, 2, 1)), 4)
add("avgpool_ceil_exclude_pad", lambda c: trunk(c, nn.AvgPool2d(3, 2, padding=1, ceil_mode=True,
                                                                count_include_pad=False),
                                                conv(6, 2, 1)), 1)
add("avgpool_ceil_include_pad", lambda c: trunk(c, nn.AvgPool2d(2, ceil_mode=True),
                                                nn.AvgPool2d(3, 3, padding=1, ceil_mode=True),
                                                conv(6, 2, 1)), 3)
add("avgpool_divisor_override", lambda c: trunk(c, nn.AvgPool2d(3, 2, padding=1,
                                                                divisor_override=4),
                                                conv(6, 2, 1)), 3)
add("lppool", lambda c: trunk(c, nn.LPPool2d(2, 2), same(6, 6), nn.ReLU(),
                              nn.LPPool2d(2, 3, stride=2), conv(6, 2, 1)), 3)
add("head_registered_before_stem", lambda c: HeadFirst(c), 3)
add("head_registered_before_stem_13", lambda c: HeadFirst(c), 13)
add("batchnorm_eval", lambda c: seq(same(c, 6), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                    same(6, 6), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 2, 1)), 3)
add("instancenorm_tracked_eval", lambda c: trunk(c, nn.InstanceNorm2d(
    6, affine=True, track_running_stats=True), conv(6, 2, 1)), 3)
add("softmax_channels", lambda c: trunk(c, same(6, 3), nn.Softmax(dim=1)), 3)
add("logsoftmax_channels", lambda c: trunk(c, nn.MaxPool2d(2), same(6, 3), nn.LogSoftmax(1)), 4)
add("sigmoid_head", lambda c: trunk(c, same(6, 1), nn.Sigmoid()), 8)
add("dropout_eval", lambda c: trunk(c, nn.Dropout(0.5), nn.Dropout2d(0.3), conv(6, 2, 1)), 3)
add("nested_identity", lambda c: seq(seq(nn.Identity(), same(c, 6)), seq(seq(nn.GELU())),
                                     nn.Identity(), same(6, 2)), 4)
add("buffer_normalize_first", lambda c: Normalized(c), 13)
add("dead_relu_branch", lambda c: DeadBranch(c), 3)

# ---------------------------------------------------------------------- padding modes

add("conv_reflect", lambda c: seq(same(c, 6, 5, padding_mode="reflect"), nn.ReLU(),
                                  same(6, 2, 3, padding_mode="reflect")), 3)
add("conv_replicate", lambda c: seq(same(c, 6, 3, padding_mode="replicate"), nn.ReLU(),
                                    nn.MaxPool2d(2), same(6, 2, 5, padding_mode="replicate")), 2)
add("conv_zeros_explicit", lambda c: seq(same(c, 6, 5, padding_mode="zeros"), nn.ReLU(),
                                         conv(6, 2, 3, padding=3, padding_mode="zeros")), 1)
add("conv_reflect_strided", lambda c: seq(conv(c, 6, 7, stride=2, padding=3,
                                               padding_mode="reflect"), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, padding=1), same(6, 2)), 4)
add("fpad_reflect_big", lambda c: seq(op(pad, "reflect6", p=(6, 6, 6, 6), mode="reflect"),
                                      conv(c, 6, 3), nn.ReLU(), conv(6, 2, 3)), 3)  # H+8
add("fpad_replicate_big", lambda c: seq(op(pad, "replicate5", p=(5, 5, 5, 5), mode="replicate"),
                                        conv(c, 2, 3)), 4)
add("fpad_constant_big", lambda c: seq(op(pad, "const4", p=(4, 4, 4, 4), value=0.7),
                                       conv(c, 6, 3), nn.Tanh(), nn.MaxPool2d(2),
                                       conv(6, 2, 1)), 1)
add("fpad_asymmetric_reflect", lambda c: seq(op(pad, "refl1302", p=(1, 3, 0, 2), mode="reflect"),
                                             conv(c, 2, 3)), 2)
add("fpad_asymmetric_constant", lambda c: seq(op(pad, "const0431", p=(0, 4, 3, 1), value=-0.3),
                                              conv(c, 6, 3), nn.ReLU(), same(6, 2)), 13)
add("pad_modules_mixed", lambda c: seq(nn.ReflectionPad2d(3), conv(c, 6, 5), nn.ReLU(),
                                       nn.ReplicationPad2d((0, 1, 0, 1)), conv(6, 6, 2),
                                       nn.ZeroPad2d((2, 0, 1, 3)), conv(6, 2, 3)), 3)
add("negative_pad_crop", lambda c: seq(same(c, 6), nn.ReLU(), nn.ZeroPad2d(-2), same(6, 2)), 3)
add("pad_then_stride_stem", lambda c: seq(op(pad, "reflect3", p=(3, 3, 3, 3), mode="reflect"),
                                          conv(c, 6, 7, stride=2), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, padding=1), conv(6, 2, 1)), 4)

# --------------------------------------------------------- crops / slices / reshapes

add("crop_const_via_shape", lambda c: seq(op(crop_2_3), same(c, 6), nn.ReLU(), same(6, 2)), 3)
add("crop_negative_indices", lambda c: seq(same(c, 4), op(crop_negative), same(4, 2)), 1)
add("narrow_const", lambda c: seq(same(c, 4), op(narrow_const), conv(4, 2, 3)), 2)
add("strided_slice_subsample", lambda c: seq(same(c, 6), nn.ReLU(), op(subsample),
                                             same(6, 2)), 3)
add("strided_slice_phase1", lambda c: seq(same(c, 6), nn.ReLU(), op(subsample_phase),
                                          same(6, 2)), 3)
add("channel_flip", lambda c: seq(op(flip_channels), same(c, 6), op(flip_channels),
                                  same(6, 2)), 3)
add("channel_roll", lambda c: seq(same(c, 6), op(roll_channels), nn.ReLU(), same(6, 2)), 4)
add("flip_conv_flip", lambda c: FlipConvFlip(c), 3)
add("transpose_conv_transpose", lambda c: TransposeConvTranspose(c), 2)
add("einsum_1x1", lambda c: Einsum1x1(c), 3)
add("matmul_channels_last", lambda c: MatmulChannelsLast(c), 4)
add("cbam_spatial_attention", lambda c: SpatialAttentionCBAM(c), 3)
add("unfold_local_attention", lambda c: LocalAttention(c), 2)
add("unfold_median", lambda c: UnfoldMedian(c), 1)
add("channel_shuffle_view", lambda c: ChannelShuffle(c), 4)
add("view_group_sum", lambda c: GroupSum(c), 8)
add("ones_channel_concat", lambda c: seq(op(ones_channel), same(c + 1, 6), nn.ReLU(),
                                         same(6, 2)), 3)
add("const_channel_from_shape", lambda c: seq(op(const_channel_from_shape), same(c + 1, 2)), 1)
add("channel_center", lambda c: seq(same(c, 6), op(channel_center), same(6, 2)), 3)
add("layernorm_channels_last", lambda c: LayerNormChannelsLast(c), 3)
add("normalize_dim1", lambda c: seq(same(c, 6), op(normalize_dim1), same(6, 2)), 4)
add("where_leaky_clamp", lambda c: seq(same(c, 6), op(where_leaky), same(6, 2)), 3)

# ------------------------------------------------------------------ interpolation

add("interp_down_half_bilinear", lambda c: trunk(c, op(interp, "down", scale=0.5,
                                                       mode="bilinear"), same(6, 2)), 3)
add("interp_down_half_antialias", lambda c: trunk(c, op(interp, "downaa", scale=0.5,
                                                        mode="bilinear", antialias=True),
                                                  same(6, 2)), 2)
add("interp_bicubic_up2", lambda c: trunk(c, nn.MaxPool2d(2), op(interp, "bicubic", scale=2,
                                                                 mode="bicubic"), same(6, 2)), 2)
add("interp_down_third_nearest_exact", lambda c: trunk(c, op(interp, "ne/3", scale=1 / 3,
                                                            mode="nearest-exact"),
                                                     same(6, 2)), 1)
add("interp_down_third_bilinear", lambda c: trunk(c, op(interp, "bl/3", scale=1 / 3,
                                                       mode="bilinear"), same(6, 2)), 2)
add("interp_down_quarter_nearest", lambda c: trunk(c, op(interp, "n/4", scale=0.25,
                                                        mode="nearest"), same(6, 2)), 3)
add("stride8_bilinear_upsample8", lambda c: trunk(c, nn.MaxPool2d(2), same(6, 6), nn.ReLU(),
                                                  nn.MaxPool2d(2), same(6, 6), nn.MaxPool2d(2),
                                                  conv(6, 2, 1),
                                                  nn.Upsample(scale_factor=8, mode="bilinear",
                                                              align_corners=False)), 3)
add("convT_k4_s2_p1", lambda c: trunk(c, same(6, 6, stride=2), nn.ReLU(),
                                      nn.ConvTranspose2d(6, 2, 4, stride=2, padding=1)), 3)
add("convT_output_padding", lambda c: trunk(c, same(6, 6, stride=2), nn.ReLU(),
                                            nn.ConvTranspose2d(6, 2, 3, stride=2, padding=1,
                                                               output_padding=1)), 1)
add("stride3_then_nearest_exact_up3", lambda c: trunk(c, same(6, 6, stride=3), nn.ReLU(),
                                                      op(interp, "ne3", scale=3,
                                                         mode="nearest-exact"), same(6, 2)), 4)
add("convT_stride3_k5", lambda c: trunk(c, nn.MaxPool2d(3), nn.ConvTranspose2d(6, 2, 5,
                                                                              stride=3)), 8)
add("interp_bilinear_x1_5", lambda c: trunk(c, op(interp, "x1.5", scale=1.5, mode="bilinear"),
                                            same(6, 2)), 2, "either")

# -------------------------------------------------------------------------- refusals

R = "refuse"
add("roll_spatial", lambda c: seq(same(c, 6), op(roll_spatial), same(6, 2)), 3, R, "roll")
add("roll_conv_unroll", lambda c: RollConvUnroll(c), 3, R, "roll")
add("crop_half_width_from_shape", lambda c: seq(same(c, 4), op(half_width), same(4, 2)), 3, R,
    ("half_width", "slice", "getitem", "shape", "crop", "size"))
add("crop_bottom_half_from_shape", lambda c: seq(op(bottom_half), same(c, 2)), 1, R,
    ("bottom_half", "slice", "getitem", "shape", "crop", "size"))
add("crop_fixed_window", lambda c: seq(same(c, 4), op(fixed_window), same(4, 2)), 2, R,
    ("fixed_window", "slice", "getitem", "shape", "crop", "size"))
add("flip_spatial", lambda c: seq(same(c, 4), op(flip_spatial), same(4, 2)), 3, R, "flip")
add("transpose_spatial", lambda c: seq(same(c, 4), op(transpose_hw), same(4, 2)), 2, R,
    ("transpose", "permute"))
add("rot90", lambda c: seq(op(rot90), same(c, 2)), 1, R, "rot90")
add("adaptive_avgpool_global", lambda c: seq(same(c, 6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                             conv(6, 2, 1)), 3, R, "AdaptiveAvgPool2d")
add("adaptive_avgpool_4x4", lambda c: seq(same(c, 6), nn.AdaptiveAvgPool2d(4),
                                          conv(6, 2, 1)), 4, R, "AdaptiveAvgPool2d")
add("adaptive_maxpool_global", lambda c: seq(same(c, 6), nn.AdaptiveMaxPool2d(1),
                                             conv(6, 2, 1)), 2, R, "AdaptiveMaxPool2d")
add("spatial_mean_center", lambda c: seq(same(c, 6), op(spatial_center), same(6, 2)), 3, R,
    "mean")
add("squeeze_excitation", lambda c: SqueezeExcite(c), 8, R, ("AdaptiveAvgPool2d", "squeeze"))
add("global_context_unet_hook", lambda c: GlobalContextUNet(c), 3, R,
    ("AdaptiveAvgPool2d", "context"))
add("groupnorm", lambda c: trunk(c, nn.GroupNorm(2, 6), same(6, 2)), 4, R, "GroupNorm")
add("instancenorm", lambda c: trunk(c, nn.InstanceNorm2d(6), same(6, 2)), 3, R,
    "InstanceNorm")
add("layernorm_spatial", lambda c: trunk(c, op(layer_norm_hw), same(6, 2)), 3, R,
    ("layer_norm", "layernorm"))
add("normalize_dim2", lambda c: trunk(c, op(normalize_dim2), same(6, 2)), 3, R, "norm")
add("multihead_attention_pixels", lambda c: PixelAttention(c), 4, R,
    ("MultiheadAttention", "attn", "attention", "flatten"))
add("nonlocal_bmm", lambda c: NonLocalBlock(c), 3, R, ("bmm", "matmul", "NonLocal", "flatten"))
add("batchnorm_train_mode", lambda c: seq(same(c, 6), nn.BatchNorm2d(6), nn.ReLU(),
                                          same(6, 2)), 3, R, "BatchNorm", train=("1",))
add("batchnorm_train_mode_nested", lambda c: DeepTrainBN(c), 3, R, ("BatchNorm", "deep.block"),
    train=("deep.block.1",))
add("batchnorm_untracked_eval", lambda c: trunk(c, nn.BatchNorm2d(6, track_running_stats=False),
                                                same(6, 2)), 3, R, "BatchNorm")
add("dropout_train_mode", lambda c: trunk(c, nn.Dropout(0.5), same(6, 2)), 3, R, "Dropout",
    train=("2",))
add("dropout2d_train_mode", lambda c: trunk(c, nn.Dropout2d(0.5), same(6, 2)), 2, R, "Dropout",
    train=("2",))
add("dropout_functional_training_true", lambda c: trunk(c, op(dropout_always), same(6, 2)), 2,
    R, "dropout")
add("conv_circular", lambda c: seq(same(c, 6, padding_mode="circular"), same(6, 2)), 3, R,
    "circular")
add("fpad_circular", lambda c: seq(op(circular_pad), conv(c, 2, 5)), 1, R, "circular")
add("interpolate_fixed_size", lambda c: trunk(c, op(resize_fixed), same(6, 2)), 3, R,
    ("interpolate", "upsample", "resize"))
add("upsample_module_fixed_size", lambda c: trunk(c, nn.Upsample(size=(40, 50)), same(6, 2)),
    2, R, "Upsample")
add("interpolate_align_corners_true", lambda c: trunk(c, op(up_align_corners), same(6, 2)), 3,
    R, ("align_corners", "interpolate", "upsample"))
add("upsample_module_align_corners", lambda c: trunk(c, nn.MaxPool2d(2), nn.Upsample(
    scale_factor=2, mode="bilinear", align_corners=True), same(6, 2)), 4, R,
    ("align_corners", "Upsample"))
add("coord_add_arange", lambda c: seq(op(add_row_index), same(c, 2)), 3, R,
    ("arange", "add_row_index", "layer '0'"))
add("coordconv_linspace", lambda c: seq(op(coordconv), same(c + 2, 2)), 2, R,
    ("linspace", "coordconv", "layer '0'"))
add("pos_embed_interpolated", lambda c: PosEmbed(c), 3, R,
    ("interpolate", "upsample", "pos", "'add'"))
add("softmax_spatial", lambda c: trunk(c, op(softmax_spatial), same(6, 2)), 3, R,
    ("softmax", "flatten"))
add("global_max_normalize", lambda c: seq(op(max_normalize), same(c, 2)), 1, R, "max")
add("global_std_normalize", lambda c: seq(op(std_normalize), same(c, 2)), 2, R,
    ("std", "var"))
add("cumsum_width", lambda c: trunk(c, op(cumsum_w), same(6, 2)), 3, R, "cumsum")
add("sort_spatial", lambda c: seq(same(c, 2), op(sort_spatial)), 1, R, ("sort", "flatten"))
add("fft_magnitude", lambda c: seq(op(fft_abs), same(c, 2)), 2, R, "fft")
add("sum_over_width", lambda c: trunk(c, op(sum_over_width), same(6, 2)), 4, R, "sum")
add("scale_by_width_from_shape", lambda c: trunk(c, op(width_scaled), same(6, 2)), 3, R,
    ("shape", "size", "sym", "width_scaled", "layer '2'"))
add("branch_on_height", lambda c: trunk(c, op(size_branch), same(6, 2)), 3, R,
    ("shape", "size", "sym", "guard", "branch", "layer '2'"))
add("branch_on_global_mean", lambda c: seq(op(value_branch), same(c, 2)), 3, R,
    ("mean", "data-dependent", "data dependent", "control flow", "value_branch", "layer '0'"))
add("super_resolution_up3", lambda c: trunk(c, op(interp, "ne3", scale=3, mode="nearest-exact"),
                                            same(6, 2)), 1, R, "stride")  # finer than input
add("fractional_maxpool", lambda c: trunk(c, nn.FractionalMaxPool2d(2, output_ratio=0.5),
                                          same(6, 2)), 3, R, "FractionalMaxPool2d")


# ------------------------------------------------------------------------ references


def random_image(rng: np.random.Generator, shape: tuple[int, int], channels: int,
                 dtype: str) -> np.ndarray:
    size = (*shape, channels)
    if dtype == "float32":
        image = rng.normal(size=size).astype(np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, size=size, endpoint=True, dtype=dtype)
    return image[..., 0] if channels == 1 and dtype == "uint8" else image  # (Y, X) too


def snapshot(model: nn.Module) -> tuple:
    return ({n: m.training for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def changes(model: nn.Module, before: tuple) -> list[str]:
    """What ``predict`` changed in the user's module (empty when nothing)."""
    training, state, grads = before
    now_training, now_state, now_grads = snapshot(model)
    out = [f"{n or '<root>'}.training {training[n]}->{now_training.get(n)}"
           for n in training if now_training.get(n) != training[n]]
    if set(state) != set(now_state):
        out.append(f"state_dict keys {sorted(set(state) ^ set(now_state))}")
    out += [f"state_dict[{k}] changed" for k in state
            if k in now_state and not torch.equal(state[k], now_state[k])]
    out += [f"{n}.requires_grad {grads[n]}->{now_grads.get(n)}"
            for n in grads if now_grads.get(n) != grads[n]]
    return out
