"""Rectangle loops: exact circulation h²(A_ji − A_ij) of linear fields, the floor for conservative fields,
the local curl in the limit of small rectangles, and the loop type added through the registry alone."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conservcheck import OUProcess
from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe
from conservcheck.batching import Batcher
from conservcheck.diagnostics.loop_integral import loop_diagnostic
from conservcheck.geometry import loops
from conservcheck.geometry.loops import make_loops
from conservcheck.timepoints import TimePoint

F64, F32 = torch.float64, torch.float32
D = 7
OU = OUProcess()
TIME = TimePoint.from_t(OU, 0.35, index=3)


def _x0(b=8, seed=2):
    return torch.randn(b, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(D, D, generator=g, dtype=F64)
    n = torch.randn(D, D, generator=g, dtype=F64)
    return LinearField(0.5 * (m + m.T), 0.5 * (n - n.T))


def _planes(batch):
    """(i, j) of each loop, read from its nodes (independent of how they were drawn): the loop starts at the
    corner (−, −) and first runs along e_i, then along e_j (counter-clockwise in the (i, j) plane)."""
    moving = (batch.points - batch.points[:, :1]).abs().amax(1) > 0  # [B, D]
    assert bool((moving.sum(1) == 2).all())
    out = []
    for b, row in enumerate(moving):
        first = torch.nonzero(batch.points[b, 1] != batch.points[b, 0]).flatten().tolist()
        assert len(first) == 1
        (other,) = [k for k in torch.nonzero(row).flatten().tolist() if k != first[0]]
        out.append((first[0], other))
    return out


@pytest.mark.parametrize("rule", ["clenshaw_curtis", "polygon"])
@pytest.mark.parametrize("side", [0.3, 1.0, 2.5])
def test_linear_field_gives_the_exact_circulation(rule, side):
    field = _linear()
    x0 = _x0()
    res = loop_diagnostic(
        as_probe(field, (D,), OU),
        x0,
        TIME,
        seed=5,
        batcher=Batcher(4096),
        path="rectangle",
        rule=rule,
        n_points=16,
        rect_side=side,
    )
    batch = make_loops("rectangle", x0, TIME, 5, n_points=16, rule=rule, rect_side=side)
    h = side * TIME.sigma
    # The nodes span [−h/2, h/2] along both axes of the plane; counter-clockwise with e_i first.
    for b, (i, j) in enumerate(_planes(batch)):
        span = batch.points[b, :, [i, j]] - batch.points[b, :, [i, j]].mean(0)
        assert torch.allclose(span.abs().amax(0), torch.full((2,), h / 2, dtype=F64), rtol=1e-14)
    a = field.A
    expected = torch.tensor([h**2 * float(a[j, i] - a[i, j]) for i, j in _planes(batch)], dtype=F64)
    # Both rules are exact for a field linear along straight edges: what is left is float64 rounding of
    # sums of ~16·D products of size |A||y|h, ≈ 1e-15 relative to the largest term.
    scale = float(res.values["abs_score_length"].max()) * h
    assert torch.allclose(res.values["circulation"], expected, rtol=0, atol=1e-13 * max(scale, 1.0))
    assert bool((expected.abs() > 1e-3 * h**2).all())  # every plane has a non-zero curl entry


def test_the_orientation_is_counter_clockwise_in_the_drawn_plane():
    """For K = e_jᵢ − e_iⱼ (s = (−y_j, y_i) in the plane) the circulation is +2 × area."""
    batch = make_loops("rectangle", _x0(1), TIME, 9, n_points=8)
    ((i, j),) = _planes(batch)
    k = torch.zeros(D, D, dtype=F64)
    k[j, i], k[i, j] = 1.0, -1.0
    res = loop_diagnostic(
        as_probe(LinearField(torch.zeros(D, D, dtype=F64), k), (D,), OU),
        _x0(1),
        TIME,
        seed=9,
        batcher=Batcher(64),
        path="rectangle",
        n_points=8,
    )
    assert float(res.values["circulation"][0]) == pytest.approx(2 * TIME.sigma**2, rel=1e-13)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_conservative_field_is_at_the_floor(dtype):
    g = torch.Generator().manual_seed(3)
    mix = GaussianMixture(torch.randn(3, D, generator=g) * 0.7, torch.rand(3, generator=g) * 0.3 + 0.2, process=OU)
    res = loop_diagnostic(
        as_probe(mix.score, (D,), OU, dtype=dtype),
        _x0(),
        TIME,
        seed=1,
        batcher=Batcher(4096),
        path="rectangle",
        n_points=64,
    )
    # Same floors as the other loop types (tests/test_loops.py): float64 rounding over ~64·D products,
    # ≈ 1e-14, with a tenfold margin; float32 ≈ 16 ulps of 2^-24.
    floor = {F64: 1e-13, F32: 1e-6}[dtype]
    assert float(res.values["circulation_ratio"].abs().max()) < floor


def test_small_rectangles_measure_the_local_curl():
    """∮ s·dy / h² → ∂_i s_j − ∂_j s_i at x_t, with an O(h²) error (the rectangle is centred on x_t)."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(D, D, generator=g, dtype=F64)
    k = k - k.T

    def field(y, t):
        return torch.tanh(y) @ k.T + 0.3 * y**3

    x0 = _x0(3)
    errors = []
    for side in (0.2, 0.1, 0.05):
        res = loop_diagnostic(
            as_probe(field, (D,), OU),
            x0,
            TIME,
            seed=4,
            batcher=Batcher(4096),
            path="rectangle",
            n_points=32,
            rect_side=side,
        )
        batch = make_loops("rectangle", x0, TIME, 4, n_points=32, rect_side=side)
        x_t = batch.points.mean(1)  # the centre of each rectangle
        h = side * TIME.sigma
        err = 0.0
        for b, (i, j) in enumerate(_planes(batch)):
            jac = torch.autograd.functional.jacobian(lambda y: field(y[None], None)[0], x_t[b])
            curl = float(jac[j, i] - jac[i, j])  # ∂_i s_j − ∂_j s_i
            err = max(err, abs(float(res.values["circulation"][b]) / h**2 - curl) / max(abs(curl), 1e-12))
        errors.append(err)
    assert errors[0] < 0.05
    # Halving h divides the error by about 4 (second order); 3 leaves room for the next-order term.
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3


def test_rect_side_is_an_audit_option_of_its_own():
    assert loops.get("rectangle").options[0].name == "rect_side"
    assert not loops.get("rectangle").in_default


PLUGIN = """
    from conservcheck.geometry.loops import LoopType
    from conservcheck.geometry.loops.rectangle import rectangle_loops


    def wide(x0, time, seed, *, n_points, rule, index):
        return rectangle_loops(x0, time, seed, n_points=n_points, rule=rule, index=index, rect_side=4.0)


    LOOP = LoopType(name="widesquare", build=wide, rules=("polygon",), summary="a square four σ wide",
                    in_default=False)


    def mixture():
        import torch
        from conservcheck import OUProcess
        from conservcheck.analytic.fields import GaussianMixture, as_probe

        mix = GaussianMixture(torch.tensor([[0.5, -0.5, 0.0], [-1.0, 0.3, 0.8]]), torch.tensor([0.6, 0.4]),
                              process=OUProcess())
        return as_probe(mix.score, (3,), OUProcess())
"""


def test_a_third_party_loop_type_needs_one_file_and_one_entry_point(tmp_path):
    """A loop type registered through the ``conservcheck.loops`` entry-point group of an installed
    distribution is audited, reported and gated like a built-in one, with nothing else changed."""
    (tmp_path / "my_loops.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "my_loops-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-loops\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[conservcheck.loops]\nwidesquare = my_loops:LOOP\n")
    report = tmp_path / "r.json"
    cmd = [
        str(Path(sys.executable).parent / "conservcheck"),
        "audit",
        "my_loops:mixture",
        "--paths",
        "widesquare,rotation",
        "--curl",
        "none",
        "--times",
        "0.3",
        "--samples",
        "3",
        "--points",
        "16",
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
        str(report),
        "--quiet",
        "--fail-if",
        "loop.widesquare.abs_circulation_ratio.median > 1e-3",
    ]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "loop · widesquare — abs_circulation_ratio" in out.stdout
    assert "gate ok: loop.widesquare" in out.stdout
    assert '"widesquare"' in report.read_text()
