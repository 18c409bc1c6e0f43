"""Clean samples drawn from the model itself with a deterministic probability-flow sampler, cached on disk.

When an audit has no ``--data``, its x0 are the model's own samples: the probability-flow ODE integrated
from nearly pure noise to clean data with DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep
scheme with one model evaluation per step whose first step is DDIM (η = 0). With λ = log(α/σ),
h_i = λ_i − λ_{i−1} and the model's clean-data prediction D = x̂0 = (x + σ² s)/α at each time,

    x_i = (σ_i/σ_{i−1}) x_{i−1} + α_i (1 − e^{−h_i}) D̃,   D̃ = (1 + 1/(2r)) D_{i−1} − 1/(2r) D_{i−2},

with r = h_{i−1}/h_i (D̃ = D_{i−1} on the first step, which is exactly DDIM); the sample is the last x̂0.
This holds for any Gaussian process (VP, VE, flow). A conditional model's samples are drawn with the
conditional field (guidance scale w = 1, the model's p(x | c)), each with its sample's condition, so the
x0 of a guided audit are the same points at every w. Times: every native index of a discrete schedule
from T−1 down to 0, ``steps`` of them evenly spaced; otherwise ``steps`` times evenly spaced in λ from
nearly pure noise to nearly clean data (:func:`conservcheck.timepoints.noise_span`). No clipping: the samples
are what the field itself transports. The starting noise of sample i comes from the stream
(seed, "sampler", i), so a sample's starting point never depends on the batch it ran in; the sample
itself is bit-identical for the same batch size and thread count, and otherwise equal to the rounding
the ODE carries from step to step (:mod:`conservcheck.report.reproducibility`).

Samples are cached (``.npy`` + a JSON key file) under huggingface_hub's assets cache,
``cached_assets_path("conservcheck", subfolder="samples")``, or ``<cache_dir>/conservcheck/default/samples``;
the file name is the SHA-256 of everything that decides the samples — the probe's identity (reference,
revision, weights SHA-256, adapter, parameterization, process, time convention, shape, data range, dtype,
precision, device type), n, seed and the sampler's name, version and steps — and the key file is compared
in full on every read, so a stale entry can never be returned. The key file also records the SHA-256 of
the ``.npy`` file, checked on every read: a cache entry damaged or changed after it was written is not
used (the samples are drawn again, with a warning). Probes without a weights hash (analytic fields, plain
callables) are never cached.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from conservcheck import conditioning, rng
from conservcheck.batching import Batcher, evaluate
from conservcheck.errors import ProbeContractError, UsageError
from conservcheck.files import cache_folder, read_input, write_atomic
from conservcheck.probe import VectorFieldProbe
from conservcheck.process import log_snr_grid
from conservcheck.timepoints import noise_span

log = logging.getLogger("conservcheck")

SAMPLER = "dpmpp_2m"
SAMPLER_VERSION = 1


def time_grid(probe: VectorFieldProbe, steps: int) -> Tensor:
    """Canonical times of the sampler, from noisy to clean: [steps] float64 (≥ 2 distinct times).

    Every native index of a discrete schedule from T−1 to 0, ``steps`` of them evenly spaced; otherwise
    ``steps`` times evenly spaced in log-SNR over :func:`~conservcheck.timepoints.noise_span`.
    """
    conv = probe.time_convention
    if conv.num_steps is not None:
        k = torch.unique_consecutive(torch.linspace(conv.num_steps - 1, 0, steps, dtype=torch.float64).round())
        return conv.to_canonical(k)
    return log_snr_grid(probe.process, *noise_span(probe), steps)


def sample(
    probe: VectorFieldProbe,
    n: int,
    seed: int,
    steps: int = 50,
    batcher: Batcher | None = None,
    index: Sequence[int] | None = None,
) -> Tensor:
    """n samples [n, *sample_shape] in the probe's dtype and device (see the module doc); sample b starts
    from the noise of global index ``index[b]`` (default b).

    Raises :class:`ProbeContractError` when the model's output turns NaN/Inf along the way.
    """
    batcher = batcher if batcher is not None else Batcher("auto", probe)
    proc = probe.process
    ts = time_grid(probe, steps)
    alpha, sigma = proc.alpha(ts), proc.sigma(ts)
    lam = torch.log(alpha / sigma)
    lo, hi = probe.data_range
    index = range(n) if index is None else index
    eps0 = torch.stack([rng.normal(probe.sample_shape, seed, "sampler", int(i), dtype=probe.dtype) for i in index])
    x = (float(alpha[0]) * 0.5 * (lo + hi) + float(sigma[0]) * eps0).to(probe.device)
    prev: Tensor | None = None
    for i, t in enumerate(ts):
        score = evaluate(probe, x, float(t), batcher=batcher)
        if not bool(torch.isfinite(score).all()):
            raise ProbeContractError(
                f"sampling from the model produced NaN/Inf at t = {float(t):.4g}",
                "pass clean samples with --data, or check the model",
            )
        pred = (x + float(sigma[i]) ** 2 * score) / float(alpha[i])
        if i + 1 == len(ts):
            break
        h = float(lam[i + 1] - lam[i])
        d = pred
        if prev is not None:
            r = float(lam[i] - lam[i - 1]) / h
            d = (1 + 0.5 / r) * pred - (0.5 / r) * prev
        x = float(sigma[i + 1] / sigma[i]) * x + float(alpha[i + 1]) * -math.expm1(-h) * d
        prev = pred
    return pred


def _key(probe: VectorFieldProbe, n: int, seed: int, steps: int) -> dict[str, Any] | None:
    info = probe.info
    if not info.weights_sha256:
        return None
    cond = probe.conditioning
    return {
        **({"conditioning": cond.describe()} if cond is not None else {}),
        "reference": info.reference,
        "revision": info.revision,
        "weights_sha256": info.weights_sha256,
        "adapter": info.adapter,
        "parameterization": probe.parameterization,
        "process": probe.process.to_dict(),
        "time_convention": probe.time_convention.to_dict(),
        "sample_shape": list(probe.sample_shape),
        "data_range": list(probe.data_range),
        "dtype": str(probe.dtype),
        "precision": probe.precision,
        "device": probe.device.type,
        "n": n,
        "seed": seed,
        "sampler": {"name": SAMPLER, "version": SAMPLER_VERSION, "steps": steps},
    }


def _name(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def is_cached(
    probe: VectorFieldProbe, n: int, seed: int, *, steps: int = 50, cache_dir: str | Path | None = None
) -> bool:
    """Whether :func:`model_samples` with these arguments reads its samples from the cache (no model work)."""
    key = _key(probe, n, seed, steps)
    return key is not None and _read(cache_folder(cache_dir), _name(key), key, (n, *probe.sample_shape)) is not None


def _write(folder: Path, name: str, x: Tensor, key: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.save(buf, x.detach().cpu().numpy(), allow_pickle=False)
    data = buf.getvalue()
    write_atomic(folder / f"{name}.npy", data)
    write_atomic(folder / f"{name}.json", json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest()}))


def _read(folder: Path, name: str, key: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached samples, or None when there are none or the entry is not exactly what was written."""
    if not (folder / f"{name}.json").exists():
        return None
    limit = 64 * math.prod(shape) + 4096
    try:
        stored = json.loads(read_input(folder / f"{name}.json", "sample cache key", "", 1 << 20))
    except (UsageError, ValueError):
        stored = None
    if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key, sort_keys=True)):
        return None  # another entry's key, or a key file of an older version: not these samples
    try:
        data = read_input(folder / f"{name}.npy", "sample cache", "", limit)
        if stored.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ValueError("its SHA-256 is not the one recorded")
        arr: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    except (UsageError, OSError, ValueError) as err:
        log.warning("the cached model samples %s are damaged (%s): drawing them again", folder / f"{name}.npy", err)
        return None
    if arr.shape != shape:
        return None
    if not np.isfinite(arr).all():
        log.warning("the cached model samples %s are not finite: drawing them again", folder / f"{name}.npy")
        return None
    return arr


def _conditional_samples(probe: VectorFieldProbe, n: int, seed: int, steps: int, batcher: Batcher | None) -> Tensor:
    """:func:`sample`, once per condition on the samples that condition is assigned (w = 1)."""
    parts = conditioning.groups(probe, range(n), seed)
    with conditioning.select(probe, guidance=1.0 if parts[0][0] is not None else None):
        if len(parts) == 1:
            with conditioning.select(probe, condition=parts[0][0]):
                return sample(probe, n, seed, steps, batcher)
        x = torch.empty(n, *probe.sample_shape, dtype=probe.dtype, device=probe.device)
        for condition, pos in parts:
            with conditioning.select(probe, condition=condition):
                x[torch.tensor(pos, device=x.device)] = sample(probe, len(pos), seed, steps, batcher, index=pos)
    return x


def model_samples(
    probe: VectorFieldProbe,
    n: int,
    seed: int,
    *,
    steps: int = 50,
    batcher: Batcher | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """x0 drawn from the model (cached when the probe has a weights hash) and a source description.

    Returns:
        (x0 [n, *sample_shape] in the probe's dtype on its device, {"kind": "model", "sampler", ...}).
    """
    key = _key(probe, n, seed, steps)
    source: dict[str, Any] = {"kind": "model", "sampler": SAMPLER, "steps": steps, "n": n}
    name = _name(key) if key else None
    folder = cache_folder(cache_dir) if key else None
    if folder is not None and name is not None and key is not None:
        arr = _read(folder, name, key, (n, *probe.sample_shape))
        if arr is not None:
            log.info("x0: %d model samples read from the cache (%s)", n, folder / f"{name}.npy")
            return torch.from_numpy(arr).to(device=probe.device, dtype=probe.dtype), source
    log.info("x0: drawing %d samples from the model (deterministic DPM-Solver++(2M), %d steps)", n, steps)
    x = _conditional_samples(probe, n, seed, steps, batcher)
    if folder is not None and name is not None and key is not None:
        try:
            _write(folder, name, x, key)
        except OSError as err:
            log.warning("could not cache model samples in %s: %s", folder, err)
    return x, source


__all__ = ["is_cached", "model_samples", "sample", "time_grid"]
