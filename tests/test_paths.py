"""Loop constructions: geometry, tangents, rule weights, seeding and the Brownian bridge's law."""

import math

import pytest
import torch

from conservcheck import OUProcess, VEProcess
from conservcheck.diagnostics.curl import block_indices
from conservcheck.errors import UsageError
from conservcheck.geometry import loops
from conservcheck.geometry.jacobian import rademacher_probes
from conservcheck.geometry.loops import make_loops
from conservcheck.geometry.loops.brownian import brownian_bridge, brownian_loops
from conservcheck.geometry.loops.projection import ProjectionLoop, projection_loops, shell_radius
from conservcheck.geometry.loops.rotation import RotationLoop, rotation_loops
from conservcheck.timepoints import TimePoint, forward_samples

F64 = torch.float64
PATH_RULES = {name: loop.rules for name, loop in loops.registered().items()}
TIME = TimePoint.from_t(OUProcess(), 0.4, index=7)


def _x0(b=4, shape=(2, 3), seed=0):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_rotation_starts_at_x_t_and_keeps_the_noise_norm():
    x0 = _x0()
    loop = RotationLoop.from_samples(x0, TIME, seed=3)
    x_t, eps = forward_samples(x0, TIME, seed=3)
    u = torch.linspace(0, 1, 37, dtype=F64)[:-1]
    y = loop.point(u)
    assert torch.equal(y[:, 0], x_t)
    # y − α x0 = σ ε′(θ) with |ε′| = |ε| for every θ: a rotation, exact to rounding.
    radius = (y - TIME.alpha * x0[:, None]).flatten(2).norm(dim=2)
    assert torch.allclose(radius, TIME.sigma * eps.flatten(1).norm(dim=1)[:, None].expand_as(radius), rtol=1e-14)


def test_rotation_pairs_every_component_and_fixes_the_odd_one():
    x0 = _x0(3, (5,))
    loop = RotationLoop.from_samples(x0, TIME, seed=1)
    _, eps = forward_samples(x0, TIME, seed=1)
    assert loop.pairs.shape == (3, 2, 2)
    for b in range(3):
        flat = loop.pairs[b].flatten()
        assert len(set(flat.tolist())) == 4  # a pairing: each paired component once
        (free,) = set(range(5)) - set(flat.tolist())
        y = loop.point(torch.rand(9, dtype=F64))
        assert torch.equal(y[b, :, free], x0[b, free] * TIME.alpha + TIME.sigma * eps[b, free].expand(9))
        for i, j in loop.pairs[b].tolist():  # (Pε)_i = ε_j, (Pε)_j = −ε_i
            assert loop.b[b, i] == TIME.sigma * eps[b, j] and loop.b[b, j] == -TIME.sigma * eps[b, i]


def test_tangents_are_derivatives_of_points():
    x0 = _x0(2, (7,))
    u = torch.tensor([0.0, 0.13, 0.5, 0.77], dtype=F64)
    for loop in (RotationLoop.from_samples(x0, TIME, 2), ProjectionLoop.from_samples(x0, TIME, 2, n_vertices=5)):
        _, jvp = torch.func.jvp(loop.point, (u,), (torch.ones_like(u),))
        # Forward-mode derivative of the same formula: agreement at rounding level.
        assert torch.allclose(loop.tangent(u), jvp, rtol=1e-12, atol=1e-12)


def test_batches_expose_points_tangents_and_params():
    x0 = _x0()
    rot = RotationLoop.from_samples(x0, TIME, 5)
    batch = rot.loops(12, "periodic")
    assert torch.equal(batch.params, torch.arange(12, dtype=F64) / 12)
    assert torch.equal(batch.points, rot.point(batch.params))
    assert torch.equal(batch.tangents, rot.tangent(batch.params))
    assert torch.allclose(batch.weights, batch.tangents / 12, rtol=1e-15, atol=0)  # × (1/12) vs ÷ 12
    assert batch.n_loops == 4 and batch.n_points == 12 and torch.equal(batch.coarse_index, torch.arange(0, 12, 2))
    proj = ProjectionLoop.from_samples(x0, TIME, 5, n_vertices=3)
    pb = proj.loops(12, "polygon")
    assert pb.n_points == 12 and torch.allclose(pb.points, proj.point(pb.params), rtol=0, atol=1e-15)
    assert brownian_loops(x0, TIME, 5, n_points=10).tangents is None


def test_projection_points_lie_on_the_shell_and_the_loop_closes():
    x0 = _x0(3, (10,))
    loop = ProjectionLoop.from_samples(x0, TIME, 4, n_vertices=6)
    batch = loop.loops(60, "clenshaw_curtis")
    dist = (batch.points - loop.center[:, None]).flatten(2).norm(dim=2)
    assert torch.allclose(dist, torch.full_like(dist, loop.radius), rtol=1e-14)
    # Vertex 0 is the forward sample x_t, projected radially.
    x_t, eps = forward_samples(x0, TIME, 4)
    d0 = TIME.sigma * eps
    assert torch.allclose(batch.points[:, 0], loop.center + loop.radius * d0 / d0.norm(dim=1, keepdim=True), rtol=1e-14)
    # End of edge j (λ = 1) is the start of edge j + 1, and the last edge ends at the first vertex.
    ends = loop.edge_points(torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.allclose(ends[:, :, 1], torch.roll(ends[:, :, 0], -1, dims=1), rtol=1e-14)


def test_projection_length_is_the_sum_of_great_circle_arcs():
    # Each edge is the radial projection of a chord: an arc of the great circle through d_j and d_{j+1},
    # of length R·angle(d_j, d_{j+1}).
    x0 = _x0(2, (9,))
    loop = ProjectionLoop.from_samples(x0, TIME, 8, n_vertices=5)
    d = loop.offsets
    dh = d / d.norm(dim=2, keepdim=True)
    cos = (dh * torch.roll(dh, -1, 1)).sum(2).clamp(-1, 1)
    exact = loop.radius * torch.acos(cos).sum(1)
    cc = loop.loops(200, "clenshaw_curtis").length_weights.sum(1)
    poly = [loop.loops(n, "polygon").length_weights.sum(1) for n in (200, 400)]
    # CC on smooth arcs with 40 nodes each: spectral, at the floor.
    assert torch.allclose(cc, exact, rtol=1e-13)
    # Inscribed polygon: error ∝ N⁻², so doubling N cuts it by 4 (to O(N⁻²) relative).
    ratio = (exact - poly[0]) / (exact - poly[1])
    assert torch.all(poly[1] < exact) and torch.allclose(ratio, torch.full_like(ratio, 4.0), rtol=1e-2)


def test_shell_radius_matches_the_chi_mean():
    dim, sigma = 50, 0.7
    # E|ε| = √2 Γ((D+1)/2)/Γ(D/2); |ε| has sd ≈ 1/√2, so 256 draws give a standard error of
    # σ·0.707/16 ≈ 0.031; allow 5 standard errors.
    mean = math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    r = shell_radius(dim, sigma, seed=0)
    assert abs(r - sigma * mean) < 5 * sigma * 0.707 / 16
    assert shell_radius(dim, 2 * sigma, seed=0) == 2 * r  # one Monte Carlo constant per (D, seed)


def test_brownian_bridge_law_and_nesting():
    u_max, n, dim = 9.0, 16, 4000
    x = brownian_bridge((dim,), n, u_max, 0, "test")
    assert torch.equal(x[0], torch.zeros(dim, dtype=F64))
    u = torch.arange(n, dtype=F64) * u_max / n
    var = x.var(dim=1)
    expected = u * (u_max - u) / u_max
    # Sample variance of 4000 independent N(0, v) components: standard error v·√(2/4000) ≈ 0.022 v;
    # allow 5 standard errors.
    assert torch.all((var[1:] - expected[1:]).abs() < 5 * 0.0224 * expected[1:])
    # Increments of a bridge are correlated −h²/U: check that consecutive increments are nearly
    # uncorrelated at this resolution and have variance h(1 − h/U).
    inc = torch.diff(torch.cat([x, x[:1]]), dim=0)
    h = u_max / n
    assert torch.all((inc.var(dim=1) / (h * (1 - h / u_max)) - 1).abs() < 5 * 0.0224)
    # Midpoint refinement: the bridge at N is every second node of the bridge at 2N (the same draws and
    # the same element-wise levels on the CPU: the same bits).
    assert torch.equal(brownian_bridge((dim,), 2 * n, u_max, 0, "test")[::2], x)
    assert torch.equal(brownian_bridge((3,), 1000, u_max, 0, "k")[::2], brownian_bridge((3,), 500, u_max, 0, "k"))


def test_brownian_loop_starts_at_x_t():
    x0 = _x0()
    batch = brownian_loops(x0, TIME, 9, n_points=20, bridge_u=4.0)
    x_t, _ = forward_samples(x0, TIME, 9)
    assert torch.equal(batch.points[:, 0], x_t)
    assert torch.equal(batch.params, torch.arange(20, dtype=F64) / 20)


@pytest.mark.parametrize("path", list(PATH_RULES))
def test_loops_are_keyed_by_sample_index(path, torch_threads):
    # The loops are the audit's random inputs: drawn per sample from keyed streams and built with
    # element-wise arithmetic and per-node norms, so they are bit-identical for any split of x0 (the
    # promise of docs/report.md#reproducibility), under 1 and 2 threads alike.
    x0 = _x0(5)
    for rule in PATH_RULES[path]:
        full = make_loops(path, x0, TIME, 11, n_points=24, rule=rule, n_vertices=4)
        parts = [
            make_loops(path, x0[:2], TIME, 11, n_points=24, rule=rule, n_vertices=4),
            make_loops(path, x0[2:], TIME, 11, n_points=24, rule=rule, n_vertices=4, index=2),
        ]
        picked = make_loops(path, x0[[4, 1]], TIME, 11, n_points=24, rule=rule, n_vertices=4, index=[4, 1])
        for name in ("points", "weights", "length_weights", "coarse_weights", "coarse_length_weights"):
            whole = getattr(full, name)
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), whole)
            assert torch.equal(getattr(picked, name), whole[[4, 1]])
        other_seed = make_loops(path, x0, TIME, 12, n_points=24, rule=rule, n_vertices=4)
        other_time = make_loops(
            path, x0, TimePoint.from_t(OUProcess(), 0.4, index=8), 11, n_points=24, rule=rule, n_vertices=4
        )
        assert not torch.allclose(other_seed.points, full.points)
        assert not torch.allclose(other_time.points, full.points)


def test_random_inputs_are_bit_identical_for_any_batching(torch_threads):
    """The draws every diagnostic starts from — forward noise, curl index sets, Rademacher probes — do not
    depend on which other samples are drawn with them: exactly the same bits for any split."""
    x0 = _x0(6)
    whole = forward_samples(x0, TIME, 5)
    parts = [
        forward_samples(x0[:1], TIME, 5),
        forward_samples(x0[1:4], TIME, 5, start=1),
        forward_samples(x0[4:], TIME, 5, start=4),
    ]
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    sets = block_indices(30, 8, 5, TIME.key, list(range(6)))
    assert torch.equal(block_indices(30, 8, 5, TIME.key, [4, 1]), sets[[4, 1]])
    keys = [("stein", TIME.key, i) for i in range(6)]
    probes = rademacher_probes((2, 3), 4, 5, keys, dtype=F64)
    assert torch.equal(rademacher_probes((2, 3), 4, 5, keys[3:], dtype=F64), probes[:, 3:])
    assert not torch.equal(rademacher_probes((2, 3), 4, 6, keys, dtype=F64), probes)


def test_node_counts_and_nesting_under_doubling():
    x0 = _x0(2, (6,))
    assert rotation_loops(x0, TIME, 0, n_points=15).n_points == 16
    assert projection_loops(x0, TIME, 0, n_points=1000, n_vertices=8).n_points == 1008  # 126 per edge
    assert projection_loops(x0, TIME, 0, n_points=16, n_vertices=3).n_points == 18
    # Every second node of 2N is a node of N: the same parameter (k/N = 2k/2N, each correctly rounded) through
    # the same element-wise formulas, per node — the same bits, which nested refinement relies on.
    for path in PATH_RULES:
        for rule in PATH_RULES[path]:
            a = make_loops(path, x0, TIME, 0, n_points=32, rule=rule, n_vertices=4)
            b = make_loops(path, x0, TIME, 0, n_points=64, rule=rule, n_vertices=4)
            assert torch.equal(b.points[:, ::2], a.points), (path, rule)


def test_ve_loops_and_bad_arguments():
    ve = TimePoint.from_t(VEProcess(), 2.5)
    x0 = _x0()
    loop = RotationLoop.from_samples(x0, ve, 0)
    assert torch.allclose(loop.center + loop.a, forward_samples(x0, ve, 0)[0], rtol=1e-15)
    with pytest.raises(UsageError):
        make_loops("spiral", x0, ve, 0)
    with pytest.raises(UsageError):
        make_loops("brownian", x0, ve, 0, rule="periodic")
    with pytest.raises(UsageError):
        projection_loops(x0, ve, 0, n_vertices=2)
    with pytest.raises(UsageError):
        rotation_loops(x0, ve, 0, index=[0, 1])
    with pytest.raises(UsageError):
        rotation_loops(x0[:, :1, :1], ve, 0)
