"""A checkpoint with an injected non-conservative error, for trying out baseline gates.

``conservcheck audit examples.ci.injected_error:digits_rotated`` (or ``injected_error:digits_rotated`` from
this folder) audits the embedded digits DDPM with a rotation added to its ε-prediction:

    ε̂'(x, k) = ε̂(x, k) + λ K x / √D,    K = (G − Gᵀ)/√2, G a fixed seeded Gaussian D×D matrix,

so the score gains s' − s = −λ K x / (√D σ_k), a field with constant curl −2λK/(√D σ_k) and no potential: it
is exactly the kind of regression a baseline gate must catch. Everything else — the weights, the schedule,
the time points, the units — is the embedded model's, so its reports are comparable with a baseline report
of ``embedded:digits``.
"""

from __future__ import annotations

import copy

import torch

import conservcheck

#: λ: the size of the injected error relative to the unit-variance ε the network predicts.
STRENGTH = 0.02
SEED = 1234


def rotation_matrix(dim: int, seed: int = SEED) -> torch.Tensor:
    """K = (G − Gᵀ)/√2 for a seeded standard Gaussian G: antisymmetric, entries of unit variance (float64)."""
    g = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (g - g.T) / 2**0.5


def with_rotation(probe: conservcheck.VectorFieldProbe, strength: float = STRENGTH) -> conservcheck.VectorFieldProbe:
    """A copy of ``probe`` whose network output gains ``strength · K x / √D`` (an ε-space rotation)."""
    k = rotation_matrix(probe.dim).to(device=probe.device, dtype=probe.dtype) * (strength / probe.dim**0.5)
    net = probe.fn

    def fn(x: torch.Tensor, native_time: torch.Tensor) -> torch.Tensor:
        return net(x, native_time) + (x.reshape(x.shape[0], -1) @ k.T).reshape(x.shape)

    out = copy.copy(probe)
    out.fn = fn
    out.info = copy.deepcopy(probe.info)
    out.info.name = f"{probe.info.name}+rotation{strength:g}"
    out.info.reference = None
    out.info.extra = {**out.info.extra, "injected_error": f"ε + {strength:g}·Kx/√D, K antisymmetric (seed {SEED})"}
    return out


def digits_rotated(device: str = "cpu", dtype: torch.dtype = torch.float32) -> conservcheck.VectorFieldProbe:
    """The embedded digits DDPM with the injected rotation (a ``module:factory`` for ``conservcheck audit``)."""
    precision = "fp64" if dtype == torch.float64 else "fp32"
    return with_rotation(conservcheck.load("embedded:digits", device=str(device), precision=precision))


def funnel_rotated(device: str = "cpu", dtype: torch.dtype = torch.float32) -> conservcheck.VectorFieldProbe:
    """The embedded funnel MLP with the injected rotation (seconds to audit: the tests' checkpoint)."""
    precision = "fp64" if dtype == torch.float64 else "fp32"
    return with_rotation(conservcheck.load("embedded:funnel", device=str(device), precision=precision))
