"""Stain augmentation for brightfield RGB patches, so a model trained on one stain generalises.

Patches are ``(B, P, P, 3)`` float arrays in ``[0, 1]`` (after dtype scaling). Each patch is,
independently and with the probabilities of :class:`StainAugment`:

1. **re-stained** (colour deconvolution, Ruifrok & Johnston 2001): optical density
   ``OD = -ln(max(rgb, 1/255))``, stain concentrations ``C = OD · M⁻¹`` (``M``: rows the unit OD
   vectors of hematoxylin, eosin, DAB), each concentration scaled by ``U(0.4, 1.6)`` (the
   second stain by ``U(0.1, 1.6)``), then
   ``rgb' = exp(-C · M')`` with *random* stain vectors ``M'``: hematoxylin jittered, the second
   stain drawn between eosin and DAB (brown; immunohistochemistry), every vector jittered by
   ``N(0, 0.08)`` per component and renormalised. Glass (``OD ≈ 0``) stays glass;
2. given a gamma ``U(0.8, 1.25)``, contrast ``U(0.8, 1.2)`` and brightness ``U(-0.06, 0.06)``
   (plus ``U(-0.03, 0.03)`` per channel: white balance);
3. blurred by a Gaussian of σ ``U(0.3, 1.6)`` px (scanner focus);
4. JPEG re-encoded at quality ``U(35, 95)`` (what scanners and web images carry);
5. given Gaussian noise of σ ``U(0, 0.02)``.

Everything is drawn from the caller's ``numpy.random.Generator`` (deterministic per seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["STAIN_VECTORS", "StainAugment", "gaussian_blur", "jpeg_roundtrip", "restain"]

#: Unit optical-density vectors (rows): hematoxylin, eosin, DAB (Ruifrok & Johnston 2001, as
#: in scikit-image's ``rgb_from_hed``).
STAIN_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAIN_VECTORS = STAIN_VECTORS / np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)
_OD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True, slots=True)
class StainAugment:
    """Probabilities of each step (see module doc); ``__call__`` applies them to a batch."""

    restain: float = 0.8
    colour: float = 0.9
    blur: float = 0.4
    jpeg: float = 0.5
    noise: float = 0.5

    def __call__(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented copy of ``batch`` ``(B, P, P, 3)`` in ``[0, 1]``, float32."""
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"stain augmentation needs (B, P, P, 3) RGB patches, got "
                             f"{batch.shape}")
        out = np.clip(batch.astype(np.float32), 0.0, 1.0)
        n = len(out)
        pick = {name: rng.random(n) < p for name, p in (
            ("restain", self.restain), ("colour", self.colour), ("blur", self.blur),
            ("jpeg", self.jpeg), ("noise", self.noise))}
        for i in np.nonzero(pick["restain"])[0]:
            out[i] = restain(out[i], rng)
        if pick["colour"].any():
            idx = np.nonzero(pick["colour"])[0]
            out[idx] = _colour(out[idx], rng)
        for i in np.nonzero(pick["blur"])[0]:
            out[i] = gaussian_blur(out[i], float(rng.uniform(0.3, 1.6)))
        for i in np.nonzero(pick["jpeg"])[0]:
            out[i] = jpeg_roundtrip(out[i], int(rng.integers(35, 96)))
        for i in np.nonzero(pick["noise"])[0]:
            out[i] += rng.normal(0.0, rng.uniform(0.0, 0.02), out[i].shape).astype(np.float32)
        return np.clip(out, 0.0, 1.0)


def random_stain_vectors(rng: np.random.Generator) -> np.ndarray:
    """A random ``(3, 3)`` stain matrix (unit rows): jittered hematoxylin, a second stain
    between eosin and DAB, jittered DAB."""
    t = rng.uniform(0.0, 1.0)
    second = (1 - t) * STAIN_VECTORS[1] + t * STAIN_VECTORS[2]
    m = np.stack([STAIN_VECTORS[0], second, STAIN_VECTORS[2]])
    m = np.abs(m + rng.normal(0.0, 0.08, m.shape))
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def restain(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``patch`` (``(P, P, 3)`` in ``[0, 1]``) deconvolved with :data:`STAIN_VECTORS` and
    recombined with :func:`random_stain_vectors`, concentrations scaled by ``U(0.4, 1.6)``
    (the second stain by ``U(0.1, 1.6)``: down to a pale counterstain, as IHC stroma)."""
    od = -np.log(np.maximum(patch, _OD_FLOOR))
    conc = np.maximum(od.reshape(-1, 3) @ np.linalg.inv(STAIN_VECTORS), 0.0)
    conc *= rng.uniform((0.4, 0.1, 0.4), 1.6)
    rgb = np.exp(-(conc @ random_stain_vectors(rng)))
    return rgb.reshape(patch.shape).astype(np.float32)


def _colour(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast and brightness (per patch; white balance per channel)."""
    n = len(batch)
    gamma = rng.uniform(0.8, 1.25, (n, 1, 1, 1)).astype(np.float32)
    out = np.power(np.clip(batch, 0.0, 1.0), gamma)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    bright = (rng.uniform(-0.06, 0.06, (n, 1, 1, 1))
              + rng.uniform(-0.03, 0.03, (n, 1, 1, 3))).astype(np.float32)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    return (out - mean) * contrast + mean + bright


def gaussian_blur(patch: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(P, P, C)`` with σ = ``sigma`` px (radius ⌈3σ⌉, edges
    reflected); the size is unchanged."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = patch
    for axis in (0, 1):
        pad = [(0, 0)] * patch.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(j, j + size), axis=axis)
                  for j, w in enumerate(k))
    return out.astype(np.float32)


def jpeg_roundtrip(patch: np.ndarray, quality: int) -> np.ndarray:
    """``patch`` (``(P, P, 3)`` in ``[0, 1]``) encoded as JPEG at ``quality`` and decoded."""
    import imagecodecs

    data = np.round(np.clip(patch, 0.0, 1.0) * 255).astype(np.uint8)
    decoded = imagecodecs.jpeg_decode(imagecodecs.jpeg_encode(data, level=quality))
    return decoded.astype(np.float32) / 255.0
