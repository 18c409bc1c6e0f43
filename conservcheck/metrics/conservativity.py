"""`ConservativityMetric`: the audit's headline metrics as a torchmetrics ``Metric``, for training loops.

An audit answers once, on a finished checkpoint; a training run wants the same numbers every N steps, like
FID, to see when a network stops (or never starts) behaving like a score. The metric runs the registered
diagnostics themselves — loop integrals (Eq. 4) and curl (Eq. 5), exactly the functions
:func:`conservcheck.audit` runs — on the clean samples each :meth:`~ConservativityMetric.update` is given, and
keeps each sample's values. :meth:`~ConservativityMetric.compute` returns, for every diagnostic variant and
each of its table metrics (the headline metric first: ``abs_circulation_ratio`` for loops, ``curl_rel_fro``
/ ``rel_asym`` for the curl), the median over samples at each time point and over all of them::

    {"loop.rotation.abs_circulation_ratio": tensor(0.0011),
     "loop.rotation.abs_circulation_ratio/k=10": tensor(0.0012), …,
     "loop.rotation.abs_circulation": tensor(1.31), …}

**Comparable across evaluations.** Every random draw — the noise that takes x0 to x_t, the loop through
it, the probe vectors — comes from the keyed streams of :mod:`conservcheck.rng`, keyed by the seed, the
time point and the sample's index. Sample b of the k-th ``update`` since the last :meth:`reset` has index
``start + b``, where ``start`` counts the samples this process has seen since the reset (offset by
``rank · 2³²`` under ``torch.distributed``, so ranks never share a stream); pass ``start=`` to choose
indices yourself (e.g. the global index of x0[0] under a DistributedSampler, which makes the values
independent of the number of ranks). So an evaluation that feeds the same x0 in the same order after each
``reset()`` measures the network on the very same loops and probe vectors each time: successive values
differ because the network changed, not because the loops did.

**Distributed.** Per-sample values are a ``cat`` list state: ``compute()`` gathers every rank's samples the
way torchmetrics gathers any list state (``torch.distributed`` all-gather, or a custom ``dist_sync_fn``),
then takes medians over all of them, so a DDP evaluation gives the medians of the union of the ranks'
samples. It composes with ``MetricCollection`` like any other metric.

**Models.** ``update`` takes a :class:`~conservcheck.probe.VectorFieldProbe` (score units at canonical time),
or the network itself when the metric was built with a ``declaration`` (the dict a ``module:factory``
returns: parameterization, process, time convention, sample shape; see
:mod:`conservcheck.adapters.custom`). A network is evaluated in eval mode with its parameters' gradients
off, and both are restored afterwards, so ``update`` can sit inside a training loop; pass the plain module
(``ddp_model.module``) or the EMA copy, not a DDP wrapper.

Needs the ``metrics`` extra: ``pip install torchmetrics`` (``pip install -e ".[metrics]"`` in a checkout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from conservcheck import diagnostics
from conservcheck.batching import DEFAULT_CPU_BATCH, Batcher
from conservcheck.errors import UsageError
from conservcheck.probe import VectorFieldProbe
from conservcheck.report.baseline import measurement_options
from conservcheck.report.summary import time_label
from conservcheck.runner.options import resolve_options
from conservcheck.timepoints import TimePoint, time_points

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise UsageError(
        "ConservativityMetric needs torchmetrics, which is not installed",
        "pip install torchmetrics (the metrics extra)",
    ) from err

#: Sample indices of rank r start at r · RANK_STRIDE (no two ranks share a random stream).
RANK_STRIDE = 2**32
TimeSpec = Sequence[int] | Sequence[float] | Sequence[TimePoint] | None


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _output(out: Any) -> Tensor:
    """A network's prediction as a tensor: diffusers' ``.sample``, the first item of a tuple, or itself."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        sample: Tensor = out.sample
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UsageError(f"the network returned a {type(out).__name__}, not a tensor", "return the prediction tensor")


@contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """A torch module in eval mode with its parameters' gradients off; both restored afterwards."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


class ConservativityMetric(Metric):
    """Medians of the loop-integral and curl headline metrics over the samples seen (module doc).

    Args:
        paths: loop types for the integral constraint (Eq. 4): ``"rotation"``, ``"rotation,projection"``,
            ``"all"``, or ``"none"``.
        curl: ``"none"``, ``"subjacobian"``, ``"hutchinson"`` or ``"both"`` (Eq. 5).
        time_points: where to measure: native indices k of a discrete schedule (ints), canonical times t
            (floats) or :class:`~conservcheck.timepoints.TimePoint` objects; default: the audit's default
            time points for the model (k = 10, 100, 250, 500, 750, 990 for a 1000-step DDPM).
        seed: the seed of every random draw; the same seed gives the same loops and probe vectors.
        n_points: nodes per loop, the same on every device so that values logged anywhere compare (the
            paper uses 1000).
        options: the audit's other measurement options, as :func:`conservcheck.audit` takes them:
            ``block`` (curl sub-Jacobian size), ``n_probes`` (Hutchinson probe vectors), and the loop types'
            ``bridge_u``, ``n_vertices``, ``rect_side``.
        declaration: units of a bare network passed to ``update`` (parameterization, process, sample_shape,
            time_convention, …; see :mod:`conservcheck.adapters.custom`); not needed for probes.
        batch_size: model batch size for the loop nodes and Jacobian products.
        **kwargs: torchmetrics ``Metric`` options (``dist_sync_fn``, ``process_group``, ``compute_on_cpu``, …).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    #: One [B, time points, columns] tensor per update (a single tensor on every rank after a sync).
    values: list[Tensor]

    def __init__(
        self,
        paths: str | Sequence[str] = "rotation",
        curl: str = "none",
        time_points: TimeSpec = None,
        seed: int = 0,
        *,
        n_points: int = 128,
        options: Mapping[str, Any] | None = None,
        declaration: Mapping[str, Any] | None = None,
        batch_size: int = DEFAULT_CPU_BATCH,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        extra = dict(options or {})
        allowed = set(measurement_options())
        bad = sorted(set(extra) - allowed)
        if bad:
            raise UsageError(
                f"ConservativityMetric does not take the option {bad[0]!r}", f"options: {', '.join(sorted(allowed))}"
            )
        given = {"paths": paths, "curl": curl, "seed": seed, "n_points": n_points, "n_samples": 1, **extra}
        self.opts = resolve_options(given)
        self.seed = self.opts["seed"]
        self.time_spec = self._time_spec(time_points)
        self.declaration = dict(declaration) if declaration is not None else None
        self.batcher = Batcher(int(batch_size))
        self.columns: list[tuple[str, str, str]] = []
        self.points: list[TimePoint] = []
        self.time_name = "t"
        self._seen = 0
        self.add_state("values", default=[], dist_reduce_fx="cat")

    @staticmethod
    def _time_spec(spec: TimeSpec) -> tuple[str, list[Any]] | None:
        if spec is None:
            return None
        items = list(spec)
        if not items:
            raise UsageError("time_points is empty", "pass time indices, canonical times, or None for the defaults")
        kinds: tuple[tuple[str, Callable[[Any], bool]], ...] = (
            ("points", lambda v: isinstance(v, TimePoint)),
            ("indices", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            ("times", lambda v: isinstance(v, float)),
        )
        for kind, ok in kinds:
            if all(ok(v) for v in items):
                return kind, items
        raise UsageError(
            f"time_points mixes kinds: {items!r}",
            "pass ints (time indices k), floats (canonical times t) or TimePoint objects, one kind",
        )

    # ------------------------------------------------------------------------------------------- inputs

    def _probe(self, model: Any, x0: Tensor) -> VectorFieldProbe:
        if isinstance(model, VectorFieldProbe):
            return model
        if self.declaration is None:
            raise UsageError(
                f"update() got a {type(model).__name__}, not a VectorFieldProbe",
                "build the metric with declaration=dict(parameterization=..., process=..., sample_shape=...) "
                "or pass a probe",
            )
        if not callable(model):
            raise UsageError(f"update() got a {type(model).__name__}, which is not callable", "pass the network")
        from conservcheck.adapters.custom import from_declaration

        def fn(x: Tensor, native_time: Tensor) -> Tensor:
            return _output(model(x, native_time))

        # A plain function, so the declaration's loader neither moves nor freezes the live network.
        return from_declaration(fn, self.declaration, device=x0.device, dtype=x0.dtype)

    def _resolve(self, probe: VectorFieldProbe) -> list[TimePoint]:
        if self.time_spec is None:
            points = time_points(probe)
        elif self.time_spec[0] == "points":
            points = list(self.time_spec[1])
        elif self.time_spec[0] == "indices":
            points = time_points(probe, time_indices=self.time_spec[1])
        else:
            points = time_points(probe, times=self.time_spec[1])
        if self.points and [p.key for p in points] != [p.key for p in self.points]:
            raise UsageError(
                "this model's time points differ from those of the metric's earlier updates",
                "use one model convention per metric, or reset it with a new ConservativityMetric",
            )
        return points

    def _plan(self, probe: VectorFieldProbe) -> list[tuple[str, diagnostics.Variant, list[str]]]:
        out = []
        for name, spec in diagnostics.registered().items():
            if name == "stein":
                continue
            for v in spec.plan(self.opts, probe):
                main, second = spec.table_metrics(v.name)
                metrics = [m for m in dict.fromkeys((spec.headline_metric(v.name), main, second)) if m]
                out.append((name, v, metrics))
        return out

    # ------------------------------------------------------------------------------------------ updates

    def update(self, model_or_probe: Any, x0: Tensor, start: int | None = None) -> None:
        """Run the diagnostics on ``x0`` [B, *sample_shape] (clean samples in the model's data coordinates)
        at every time point and keep each sample's values; sample b has random-stream index ``start + b``
        (default: the module doc's running index)."""
        if not isinstance(x0, Tensor) or x0.ndim < 2 or x0.shape[0] == 0:
            raise UsageError("x0 must be a batch [B, *sample_shape] with B ≥ 1", "pass clean samples")
        probe = self._probe(model_or_probe, x0)
        points = self._resolve(probe)
        if start is None:
            start = _rank() * RANK_STRIDE + self._seen
        plan = self._plan(probe)
        columns = [(name, variant.name, m) for name, variant, metrics in plan for m in metrics]
        if self.columns and columns != self.columns:
            raise UsageError("the diagnostics planned for this model differ from earlier updates", "use one model")
        values = torch.empty(x0.shape[0], len(points), len(columns), dtype=torch.float64)
        with _evaluating(model_or_probe if not isinstance(model_or_probe, VectorFieldProbe) else None):
            for j, tp in enumerate(points):
                col = 0
                for name, variant, metrics in plan:
                    result = variant.run(
                        probe, x0.detach(), tp, seed=self.seed, batcher=self.batcher, start=start, **variant.kwargs
                    )
                    for m in metrics:
                        values[:, j, col] = _column(result.values, m, diagnostics.get(name).abs_columns)
                        col += 1
        self.columns, self.points = columns, points
        self.time_name = probe.process.to_dict().get("time", "t")
        self._seen += x0.shape[0]
        self.values.append(values.to(self.device))

    # ------------------------------------------------------------------------------------------ results

    def compute(self) -> dict[str, Tensor]:
        """Medians over all samples (every rank's, after sync): ``diag.variant.metric`` over every time point
        and ``diag.variant.metric/<time>`` per time point (``k=500``, ``t=0.25``)."""
        if not self.columns or (isinstance(self.values, list) and not self.values):
            raise UsageError("ConservativityMetric.compute() before any update()", "call update(model, x0) first")
        values = dim_zero_cat(self.values).to(torch.float64)
        out: dict[str, Tensor] = {}
        for c, (name, variant, metric) in enumerate(self.columns):
            key = f"{name}.{variant}.{metric}"
            out[key] = torch.quantile(values[:, :, c].reshape(-1), 0.5)
            for j, tp in enumerate(self.points):
                label = time_label({"index": tp.index, "t": tp.t}, self.time_name)
                out[f"{key}/{label}"] = torch.quantile(values[:, j, c], 0.5)
        return out

    def per_sample(self) -> dict[str, Tensor]:
        """The synced per-sample values: ``diag.variant.metric`` → [N, time points] (float64)."""
        if not self.columns:
            raise UsageError("ConservativityMetric.per_sample() before any update()", "call update(model, x0) first")
        with self.sync_context():
            values = dim_zero_cat(self.values).to(torch.float64)
        return {f"{n}.{v}.{m}": values[:, :, c] for c, (n, v, m) in enumerate(self.columns)}

    def reset(self) -> None:
        """Forget the samples seen; the next update starts again at the same sample indices (and loops)."""
        super().reset()
        self._seen = 0


def _column(values: Mapping[str, Tensor], metric: str, abs_columns: Sequence[str]) -> Tensor:
    """A result column, or the ``abs_<column>`` the audit adds for the diagnostic's signed columns."""
    if metric in values:
        return values[metric].detach().to("cpu", torch.float64)
    base = metric.removeprefix("abs_")
    if metric.startswith("abs_") and base in abs_columns and base in values:
        return values[base].detach().to("cpu", torch.float64).abs()
    raise KeyError(metric)


__all__ = ["RANK_STRIDE", "ConservativityMetric"]
