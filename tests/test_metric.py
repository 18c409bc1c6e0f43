"""ConservativityMetric: the diagnostics' own numbers, the same loops at every evaluation, batching that
changes nothing, a live network left as it was, MetricCollection, and synchronisation across two real
processes (a gloo process group on the CPU) by torchmetrics' own mechanism."""

from __future__ import annotations

import math

import pytest
import torch

torchmetrics = pytest.importorskip("torchmetrics")

from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe  # noqa: E402
from conservcheck.batching import Batcher  # noqa: E402
from conservcheck.diagnostics.curl import block_indices, curl_subjacobian  # noqa: E402
from conservcheck.diagnostics.loop_integral import loop_diagnostic  # noqa: E402
from conservcheck.errors import UsageError  # noqa: E402
from conservcheck.metrics import RANK_STRIDE, ConservativityMetric  # noqa: E402
from conservcheck.timepoints import time_points  # noqa: E402

D = 5
ROT = "loop.rotation.abs_circulation_ratio"
TIMES = [0.1, 0.7]
pytestmark = pytest.mark.usefixtures("single_thread")


def _linear(kappa: float = 0.4):
    """s(x) = (S + κK) x: S negative definite, K antisymmetric (a known, time-independent rotation)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    sym = -(a @ a.T) / D - torch.eye(D, dtype=torch.float64)
    return LinearField(sym, kappa * (a - a.T) / 2)


def _probe(kappa: float = 0.4):
    return as_probe(_linear(kappa), sample_shape=(D,), dtype=torch.float64)


def _x0(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _metric(**kw) -> ConservativityMetric:
    kw.setdefault("paths", "rotation")
    kw.setdefault("curl", "subjacobian")
    kw.setdefault("time_points", TIMES)
    kw.setdefault("n_points", 32)
    kw.setdefault("options", {"block": 4})
    return ConservativityMetric(**kw)


def test_values_are_the_diagnostics_own_numbers():
    """Per-sample values equal direct calls of loop_diagnostic and curl_subjacobian with the same sample
    indices (the same computation on the same shapes: equal to the last bit)."""
    probe, x0 = _probe(), _x0()
    m = _metric(seed=7)
    m.update(probe, x0[:3])
    m.update(probe, x0[3:])
    got = m.per_sample()
    batcher = Batcher(256)
    for j, tp in enumerate(time_points(probe, times=TIMES)):
        for start, part in ((0, x0[:3]), (3, x0[3:])):
            rows = slice(start, start + len(part))
            loop = loop_diagnostic(probe, part, tp, seed=7, batcher=batcher, path="rotation", n_points=32, start=start)
            curl = curl_subjacobian(probe, part, tp, seed=7, batcher=batcher, block=4, start=start)
            assert torch.equal(
                got["loop.rotation.abs_circulation_ratio"][rows, j], loop.values["circulation_ratio"].abs()
            )
            assert torch.equal(got["loop.rotation.abs_circulation"][rows, j], loop.values["abs_circulation"])
            assert torch.equal(got["curl.subjacobian.curl_rel_fro"][rows, j], curl.values["curl_rel_fro"])


def test_compute_gives_medians_per_time_point_and_overall():
    m = _metric()
    m.update(_probe(), _x0())
    out = m.compute()
    values = m.per_sample()["curl.subjacobian.curl_mean_abs"]
    assert set(out) >= {"curl.subjacobian.curl_mean_abs", "curl.subjacobian.curl_mean_abs/t=0.1"}
    assert float(out["curl.subjacobian.curl_mean_abs/t=0.7"]) == pytest.approx(float(values[:, 1].median()), rel=0.2)
    assert float(out["curl.subjacobian.curl_mean_abs"]) == float(torch.quantile(values.reshape(-1), 0.5))


def test_known_answers_rotation_and_conservative_floor():
    """s = A x with A = S + K: the curl ∂ᵢsⱼ − ∂ⱼsᵢ = A_ji − A_ij = −2K_ij everywhere, so each sample's
    curl_mean_abs is the mean of 2|K_ij| over the off-diagonal pairs of its (seeded) 4×4 block; a Gaussian
    score (a gradient) sits at the float64 floor."""
    field = _linear(0.4)
    x0 = _x0()
    m = _metric(time_points=[0.3], seed=2)
    m.update(_probe(0.4), x0)
    curl = m.per_sample()["curl.subjacobian.curl_mean_abs"][:, 0]
    (tp,) = time_points(_probe(), times=[0.3])
    sets = block_indices(D, 4, 2, tp.key, list(range(len(x0))))
    off = ~torch.eye(4, dtype=torch.bool)
    expected = torch.stack([(2 * field.K[s][:, s].abs())[off].mean() for s in sets])
    assert torch.allclose(curl, expected, rtol=1e-12, atol=0)
    gm = GaussianMixture(torch.zeros(1, D, dtype=torch.float64), 0.5)
    exact = as_probe(gm.score, sample_shape=(D,), dtype=torch.float64)
    m = _metric(time_points=[0.3])
    m.update(exact, x0)
    out = m.compute()
    assert float(out["loop.rotation.abs_circulation_ratio"]) < 1e-12
    assert float(out["curl.subjacobian.curl_rel_fro"]) < 1e-12


def test_same_loops_at_every_evaluation_and_batching_changes_nothing():
    probe, x0 = _probe(), _x0()
    m = _metric(seed=3)
    m.update(probe, x0)
    first = m.compute()
    m.reset()
    m.update(probe, x0)
    again = m.compute()
    assert all(torch.equal(first[k], again[k]) for k in first)
    m.reset()
    for part in x0.split(3):
        m.update(probe, part)
    chunked = m.compute()
    # Different batch shapes: the same loops, summed in other chunks (float64 rounding only).
    assert all(math.isclose(float(first[k]), float(chunked[k]), rel_tol=1e-10) for k in first)
    other = _metric(seed=4)
    other.update(probe, x0)
    assert not torch.equal(
        other.compute()["loop.rotation.abs_circulation_ratio"], first["loop.rotation.abs_circulation_ratio"]
    )


class EpsNet(torch.nn.Module):
    """A small ε-network with a time input and a trainable rotation (not a score)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D, dtype=torch.float64)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(self.lin(x)) * (1 + t.to(x.dtype))[:, None]


def test_a_live_network_is_left_as_it_was():
    net = EpsNet().train()
    declaration = dict(parameterization="epsilon", process="ou", time_convention="linear", sample_shape=(D,))
    m = _metric(time_points=[10, 500], declaration=declaration)
    x0 = _x0()
    m.update(net, x0)
    assert net.training and all(p.requires_grad for p in net.parameters())
    # Eval mode during the update (dropout off): the values are deterministic.
    m2 = _metric(time_points=[10, 500], declaration=declaration)
    m2.update(net, x0)
    a, b = m.compute(), m2.compute()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["loop.rotation.abs_circulation_ratio/k=500"]) > 1e-6
    with pytest.raises(UsageError, match="not a VectorFieldProbe"):
        _metric().update(net, x0)


def test_metric_collection_and_mistakes():
    coll = torchmetrics.MetricCollection({"conservativity": _metric()})
    coll.update(_probe(), _x0())
    out = coll.compute()
    assert any(k.endswith("loop.rotation.abs_circulation_ratio") for k in out)
    with pytest.raises(UsageError, match="before any update"), pytest.warns(UserWarning, match="before the"):
        _metric().compute()
    with pytest.raises(UsageError, match="does not take the option 'device'"):
        ConservativityMetric(options={"device": "cuda"})
    with pytest.raises(UsageError, match="mixes kinds"):
        ConservativityMetric(time_points=[10, 0.5])


# ------------------------------------------------------------------------------------------ distributed


def _rank_main(rank: int, world: int, init_file: str, queue) -> None:
    """One rank of a gloo group: update with its half of x0 (explicit global indices, and default ones)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probe, x0 = _probe(), _x0(8)
        half = x0.shape[0] // world
        part = x0[rank * half : (rank + 1) * half]
        explicit = _metric(seed=5)
        explicit.update(probe, part, start=rank * half)
        implicit = _metric(seed=5)
        implicit.update(probe, part)
        queue.put(
            (
                rank,
                {k: float(v) for k, v in explicit.compute().items()},
                {k: v.tolist() for k, v in explicit.per_sample().items()},
                {k: float(v) for k, v in implicit.compute().items()},
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_group_syncs_like_torchmetrics(tmp_path):
    """compute() on each rank of a real 2-process group gives the medians of all 8 samples: with global
    indices passed explicitly, exactly what one process computes on all of x0; with the default indices
    (rank · 2³² + position), the medians of the union of the ranks' own draws."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = tmp_path / "gloo-init"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(init), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, explicit, samples, implicit = queue.get(timeout=300)
        results[rank] = (explicit, samples, implicit)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _metric(seed=5)
    probe, x0 = _probe(), _x0(8)
    single.update(probe, x0)
    expected = single.compute()
    for rank in (0, 1):
        explicit, samples, implicit = results[rank]
        assert len(samples["loop.rotation.abs_circulation_ratio"]) == 8
        for k, v in expected.items():
            # The same loops; each rank evaluates 4 of them in one batch instead of 8 (float64 rounding).
            assert math.isclose(explicit[k], float(v), rel_tol=1e-10), k
        assert implicit == results[0][2]
    # Rank 1's default indices start at 2³²: its loops are its own, not rank 0's or the explicit ones'.
    lone = _metric(seed=5)
    lone.update(probe, x0[4:], start=RANK_STRIDE)
    lone_rank0 = _metric(seed=5)
    lone_rank0.update(probe, x0[:4], start=0)
    union = torch.cat(
        [
            lone_rank0.per_sample()["loop.rotation.abs_circulation_ratio"],
            lone.per_sample()["loop.rotation.abs_circulation_ratio"],
        ]
    )
    assert math.isclose(
        results[0][2]["loop.rotation.abs_circulation_ratio"],
        float(torch.quantile(union.reshape(-1), 0.5)),
        rel_tol=1e-10,
    )
