"""The audit API: options, time points, known answers, bad models, resume, x0 sources and model samples."""

from __future__ import annotations

import inspect
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import assert_reproducible

from conservcheck import DiscreteSchedule, FlowProcess, OUProcess, VectorFieldProbe, VEProcess, rng
from conservcheck.analytic.fields import GaussianMixture, LinearField, as_probe
from conservcheck.batching import Batcher
from conservcheck.contract import TIME_IGNORED
from conservcheck.errors import UsageError
from conservcheck.runner.audit import AuditInterrupted, audit
from conservcheck.runner.options import audit_options
from conservcheck.runner.units import control_probe
from conservcheck.timepoints import (
    DISCRETE_FRACTIONS,
    NOISE_LEVELS,
    START_OU_T,
    VE_LEVELS,
    TimePoint,
    forward_samples,
    time_points,
)
from conservcheck.x0.data import load_data
from conservcheck.x0.model_samples import model_samples, sample

KAPPA = 0.7


def linear_probe() -> VectorFieldProbe:
    """s(y, t) = (1 + t)(−I + K) y with K = κ [[0, 1], [−1, 0]]: a contraction plus a rotation, using its time."""
    lin = LinearField(
        -torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, KAPPA], [-KAPPA, 0.0]], dtype=torch.float64)
    )
    return VectorFieldProbe(
        lambda x, t: lin(x) * (1 + t)[:, None], process=OUProcess(), sample_shape=(2,), dtype=torch.float64
    )


def mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.3, 0.2]], dtype=torch.float64), 0.3)


def mixture_probe() -> VectorFieldProbe:
    """The mixture's exact score; its data are unbounded, so the nominal data range is wide."""
    probe = as_probe(mixture(), (3,))
    probe.data_range = (-5.0, 5.0)
    return probe


@pytest.fixture
def x0_file(tmp_path):
    """Factory: save an array as .npy and return its path as a string."""

    def save(arr, name="x0.npy"):
        path = tmp_path / name
        np.save(path, np.asarray(arr))
        return str(path)

    return save


def _run(probe, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return audit(probe, **kw)


def _comparable(report):
    data = report.to_dict()
    data.pop("run")
    return data


# --------------------------------------------------------------------------------------------- options


def test_every_option_is_an_audit_keyword_with_the_table_default():
    params = inspect.signature(audit).parameters
    for o in audit_options():
        assert params[o.name].default == o.default
        assert o.flag.startswith("--")
    assert len({o.flag for o in audit_options()}) == len(audit_options())


def test_unknown_and_bad_options_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown audit option 'n_sample'") as err:
        audit(linear_probe(), n_sample=4)
    assert err.value.hint == "did you mean 'n_samples'?"
    with pytest.raises(UsageError, match="--paths"):
        audit(linear_probe(), paths="rotation,circle")
    with pytest.raises(UsageError, match="nothing to audit"):
        audit(linear_probe(), paths="none", curl="none")
    with pytest.raises(UsageError, match="combined"):
        audit(linear_probe(), times=[0.1], sigmas=[0.5])
    with pytest.raises(UsageError, match="--time-indices needs a model with a discrete schedule"):
        _run(linear_probe(), tmp_path, time_indices=[10], curl="none")


def test_default_time_points_per_process():
    sched = DiscreteSchedule.linear()
    ddpm = VectorFieldProbe(
        lambda x, k: x, process=OUProcess(), time_convention=sched, sample_shape=(2,), parameterization="epsilon"
    )
    assert [p.index for p in time_points(ddpm)] == [10, 100, 250, 500, 750, 990]
    assert [p.index for p in time_points(ddpm)] == [round(f * 1000) for f in DISCRETE_FRACTIONS]
    assert time_points(ddpm)[0].t == pytest.approx(float(sched.to_canonical(torch.tensor(10.0))))
    ou = as_probe(mixture(), (3,))
    assert [p.sigma for p in time_points(ou)] == pytest.approx(list(NOISE_LEVELS), rel=1e-12)
    ve = VectorFieldProbe(lambda x, s: x, process=VEProcess(), sample_shape=(2,), data_range=(0.0, 1.0))
    assert [p.t for p in time_points(ve)] == pytest.approx(list(VE_LEVELS))
    flow = VectorFieldProbe(lambda x, t: x, process=FlowProcess(), sample_shape=(2,), parameterization="velocity")
    assert [p.t for p in time_points(flow)] == pytest.approx(list(NOISE_LEVELS))


def test_sigmas_snap_to_the_nearest_index_on_a_discrete_schedule():
    sched = DiscreteSchedule.linear()
    ddpm = VectorFieldProbe(lambda x, k: x, process=OUProcess(), time_convention=sched, sample_shape=(2,))
    (point,) = time_points(ddpm, sigmas=[0.5])
    ab = sched.alphas_cumprod
    k = int(torch.argmin((torch.sqrt(1 - ab) - 0.5).abs()))
    assert point.index == k and abs(point.sigma - 0.5) < 2e-3
    assert [p.index for p in time_points(ddpm, time_indices=[500, 10, 500])] == [10, 500]
    with pytest.raises(UsageError, match="outside the schedule"):
        time_points(ddpm, time_indices=[1000])


# --------------------------------------------------------------------------------------- known answers


def test_linear_field_matches_the_closed_forms(tmp_path, x0_file):
    """x0 = 0 and D = 2: every rotation loop is the circle of radius r = σ|ε| around 0. The −I part is a
    gradient and integrates to zero; K y is tangent to the circle, so |∮ s·dy| = 2π (1 + t) κ r²,
    ∮|s||dy| = (1 + t) √(1 + κ²) r · 2πr, |Eq. 7| = 2 (1 + t) κ. The Jacobian is J = (1 + t)(−I + K):
    the 2 × 2 block gives |C_01| = 2 (1 + t) κ and ‖C‖_F / ‖J + Jᵀ‖_F = κ; and ‖J − Jᵀ‖_F / (2‖J‖_F)
    = κ/√(1 + κ²), which Hutchinson's estimator returns exactly here (JᵀJ ∝ I, so vᵀJᵀJv = |v|²·c)."""
    times = [0.1, 1.0]
    rep = _run(
        linear_probe(),
        tmp_path,
        paths="rotation",
        curl="both",
        times=times,
        n_samples=5,
        n_points=16,
        data=x0_file(np.zeros((5, 2))),
        precision="fp64",
    )
    rows = rep.rows[(rep.rows["field"] == "model")]
    # The periodic rule is exact for trigonometric polynomials of degree < N (here 2, N = 16) and the
    # Jacobian products are exact for a linear field: only float64 rounding remains (rtol 1e-12).
    for t in times:
        tp = TimePoint.from_t(OUProcess(), t)
        _, eps = forward_samples(torch.zeros(5, 2, dtype=torch.float64), tp, seed=0)
        r2 = tp.sigma**2 * (eps**2).sum(1).numpy()
        loop = rows[(rows["t"] == t) & (rows["diagnostic"] == "loop")].sort_values("sample")
        np.testing.assert_allclose(loop["abs_circulation"], 2 * math.pi * (1 + t) * KAPPA * r2, rtol=1e-12)
        np.testing.assert_allclose(loop["abs_circulation_ratio"], KAPPA / math.sqrt(1 + KAPPA**2), rtol=1e-12)
        np.testing.assert_allclose(loop["abs_eq7"], 2 * (1 + t) * KAPPA, rtol=1e-12)
        np.testing.assert_allclose(loop["abs_circulation_per_length"], (1 + t) * KAPPA * np.sqrt(r2), rtol=1e-12)
        sub = rows[(rows["t"] == t) & (rows["variant"] == "subjacobian")]
        np.testing.assert_allclose(sub["curl_mean_abs"], 2 * (1 + t) * KAPPA, rtol=1e-12)
        np.testing.assert_allclose(sub["curl_rel_fro"], KAPPA, rtol=1e-12)
        hut = rows[(rows["t"] == t) & (rows["variant"] == "hutchinson")]
        np.testing.assert_allclose(hut["rel_asym"], KAPPA / math.sqrt(1 + KAPPA**2), rtol=1e-12)
    assert rep.verdict.status == "violation"
    assert {c["status"] for c in rep.verdict.checks} == {"violation"} and len(rep.verdict.checks) == 6
    assert rep.header["jacobian_strategy"]["curl.subjacobian"] in ("jvp", "double_vjp", "fd")
    control = rep.rows[rep.rows["field"] == "control"]
    assert control["abs_circulation_ratio"].max() < 1e-12 and control["curl_rel_fro"].max() < 1e-12


def test_exact_mixture_score_passes(tmp_path, x0_file):
    gm = mixture()
    x0 = gm.sample(8, torch.Generator().manual_seed(0))
    ref = tmp_path / "mixture.json"
    ref.write_text(json.dumps({"means": gm.means.tolist(), "stds": [0.3, 0.3]}))
    rep = _run(
        mixture_probe(),
        tmp_path,
        paths="rotation,projection",
        curl="both",
        stein=f"mixture:{ref}",
        times=[0.05, 0.5, 2.0],
        n_samples=8,
        n_points=32,
        data=x0_file(x0.numpy()),
        precision="fp64",
    )
    assert rep.verdict.status == "pass", rep.verdict.reason
    s = rep.summary()
    # A conservative field's rotation-loop integral and Jacobian asymmetry are pure float64 rounding
    # (the periodic rule converges spectrally for this smooth integrand at N = 32).
    for variant, metric in (
        ("rotation", "abs_circulation_ratio"),
        ("subjacobian", "curl_rel_fro"),
        ("hutchinson", "rel_asym"),
    ):
        assert (s.query(f"variant == '{variant}' and metric == '{metric}'")["median"] < 1e-12).all()
    # The model is the reference itself: e = 0, and 𝒮e is rounding of the two divergences.
    stein = rep.rows[rep.rows["diagnostic"] == "stein"]
    assert set(stein["variant"]) == {"mixture"} and (stein["err_norm"] == 0).all()
    assert stein["stein"].abs().max() < 1e-10
    assert rep.header["data_source"]["kind"] == "array" and rep.header["options"]["cpu_scaled"] is False


def test_adaptive_loop_nodes(tmp_path, x0_file):
    x0 = mixture().sample(4, torch.Generator().manual_seed(3))
    rep = _run(
        mixture_probe(),
        tmp_path,
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=4,
        n_points="auto",
        data=x0_file(x0.numpy()),
        precision="fp64",
    )
    rows = rep.rows[rep.rows["field"] == "model"]
    assert rep.header["options"]["n_points"] == "auto" and (rows["converged"] == 1.0).all()
    assert rep.verdict.status == "pass"


def test_control_field_is_the_fitted_gaussian_score():
    x0 = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    probe = control_probe(linear_probe(), x0)
    t = 0.3
    a, s2 = math.exp(-t), -math.expm1(-2 * t)
    mean, var = x0.mean(0), x0.var(0, unbiased=False)
    y = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    expected = -(y - a * mean) / (a**2 * var + s2)
    torch.testing.assert_close(probe.score(y, t), expected, rtol=1e-12, atol=0)
    assert probe.dtype == torch.float64 and probe.info.adapter == "control"


# ------------------------------------------------------------------------------------------- bad models


def test_nan_outputs_are_reported_per_time_point(tmp_path, x0_file):
    def fn(x, t):
        return torch.where((t > 0.5)[:, None], torch.full_like(x, torch.nan), -x * (1 + t)[:, None])

    probe = VectorFieldProbe(fn, process=OUProcess(), sample_shape=(2,), dtype=torch.float64)
    rep = _run(
        probe,
        tmp_path,
        paths="rotation",
        curl="none",
        times=[0.1, 1.0],
        n_samples=4,
        n_points=16,
        data=x0_file(np.full((4, 2), 0.1)),
    )
    units = {(u["field"], u["time_key"]): u["status"] for u in rep.units}
    assert units[("model", "t0.1")] == "ok" and units[("model", "t1")] == "nonfinite"
    s = rep.summary()
    assert s[s["time_key"] == "t1"]["median"].isna().all()
    assert s[s["time_key"] == "t0.1"]["median"].notna().all()
    assert rep.verdict.status == "invalid"
    assert any("loop.rotation (model) at t=1: NaN/Inf values in 4 of 4 samples" in p for p in rep.header["problems"])


def test_wrong_output_shape_does_not_stop_the_audit(tmp_path, x0_file):
    probe = VectorFieldProbe(
        lambda x, t: x[:, :1] * t[:, None], process=OUProcess(), sample_shape=(2,), dtype=torch.float64
    )
    rep = _run(
        probe,
        tmp_path,
        paths="rotation",
        curl="none",
        times=[0.1],
        n_samples=2,
        n_points=8,
        data=x0_file(np.zeros((2, 2))),
    )
    assert rep.verdict.status == "invalid" and "model output has shape" in rep.verdict.reason
    assert [u["status"] for u in rep.units] == ["error", "ok"]  # the control still runs


def test_model_ignoring_time_is_a_warning(tmp_path, x0_file):
    """A score that does not change with time and is not the stationary −x: measured, with a warning."""
    probe = VectorFieldProbe(lambda x, t: -2 * x, process=OUProcess(), sample_shape=(2,), dtype=torch.float64)
    rep = _run(
        probe,
        tmp_path,
        paths="rotation",
        curl="none",
        times=[0.1],
        n_samples=2,
        n_points=8,
        data=x0_file(np.zeros((2, 2))),
    )
    assert rep.verdict.status == "pass" and rep.header["problems"] == []
    assert rep.header["warnings"] == [TIME_IGNORED]


def test_sampling_failure_is_an_invalid_report(tmp_path):
    probe = VectorFieldProbe(
        lambda x, t: torch.full_like(x, torch.inf) * t[:, None],
        process=OUProcess(),
        sample_shape=(2,),
        dtype=torch.float64,
    )
    rep = _run(probe, tmp_path, paths="rotation", curl="none", times=[0.1], n_samples=2, n_points=8)
    assert (
        rep.verdict.status == "invalid"
        and rep.units == []
        and "sampling from the model" in rep.header["data_source"]["error"]
    )


# ------------------------------------------------------------------------------- reproducibility, resume


def test_same_seed_same_report_any_batch_size(tmp_path, x0_file, torch_threads):
    gm = mixture()
    data = x0_file(gm.sample(6, torch.Generator().manual_seed(1)).numpy())
    kw = dict(paths="rotation,brownian", curl="subjacobian", block=2, times=[0.2, 1.0], n_samples=6, n_points=16)
    kw["data"] = data
    a = _run(mixture_probe(), tmp_path, **kw)
    # Another batch size, memory budget or thread count: kernels may round differently, so the promise
    # is the float64 reproducibility tolerance (docs/report.md#reproducibility), every non-number equal.
    b = _run(mixture_probe(), tmp_path, batch_size=7, **kw)
    assert_reproducible(_comparable(a), _comparable(b), "fp64")
    # 4 KB at 48 bytes per float64 loop node component: one 16-node loop (D = 3) at a time instead of all six.
    small = _run(mixture_probe(), tmp_path, memory_budget="4KB", **kw)
    assert_reproducible(_comparable(a), _comparable(small), "fp64")
    assert small.run["options"]["memory_budget"] == 4096
    if torch_threads == 1:
        torch.set_num_threads(2)  # the fixture restores the setting
        other, ref = _comparable(_run(mixture_probe(), tmp_path, batch_size=5, **kw)), _comparable(a)
        assert (ref["environment"].pop("cpu_threads"), other["environment"].pop("cpu_threads")) == (1, 2)
        assert_reproducible(ref, other, "fp64")
        c = _run(mixture_probe(), tmp_path, seed=1, **kw)
        assert _comparable(c) != _comparable(a)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, x0_file):
    gm = mixture()
    data = x0_file(gm.sample(4, torch.Generator().manual_seed(2)).numpy())
    kw = dict(paths="rotation,brownian", curl="none", times=[0.2, 1.0], n_samples=4, n_points=16, data=data)
    partial = tmp_path / "partial.jsonl"
    calls = []

    def interrupt(done, total, text):
        calls.append(text)
        if len(calls) == 3:  # called once per finished unit (x0 come from a file: no sampling call)
            raise KeyboardInterrupt

    with pytest.raises(AuditInterrupted) as stop:
        _run(mixture_probe(), tmp_path, resume=str(partial), progress=interrupt, **kw)
    assert stop.value.partial_path == partial and stop.value.n_done == 3
    with open(partial, "a") as f:
        f.write('{"key": "model/loop/brownian/t1", "fie')  # a unit cut off by a killed job
    resumed = _run(mixture_probe(), tmp_path, resume=str(partial), **kw)
    fresh = _run(mixture_probe(), tmp_path, **kw)
    assert resumed.run["units_reused"] == 3
    assert _comparable(resumed) == _comparable(fresh)
    with pytest.raises(UsageError, match="partial results of a different audit"):
        _run(mixture_probe(), tmp_path, resume=str(partial), **{**kw, "seed": 5})


def test_time_budget_skips_the_remaining_units(tmp_path, x0_file):
    rep = _run(
        linear_probe(),
        tmp_path,
        paths="rotation",
        curl="none",
        times=[0.1, 1.0],
        n_samples=2,
        n_points=8,
        data=x0_file(np.zeros((2, 2))),
        time_budget=1e-9,
    )
    assert {u["status"] for u in rep.units} == {"skipped"} and rep.header["complete"] is False
    assert "incomplete" in rep.verdict.reason


# -------------------------------------------------------------------------------------------- x0 sources


def _image_probe(shape=(1, 4, 4)):
    return VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=shape, dtype=torch.float64)


def test_image_folder_is_resized_and_mapped_to_the_data_range(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "class0"
    folder.mkdir(parents=True)
    Image.new("L", (8, 8), 0).save(folder / "a.png")
    Image.new("L", (8, 8), 255).save(folder / "b.png")
    Image.new("L", (8, 8), 51).save(folder / "c.jpg", quality=100)
    x, info = load_data(str(tmp_path / "images"), _image_probe(), 3, seed=0)
    assert x.shape == (3, 1, 4, 4) and info["kind"] == "folder"
    # Constant images stay constant under resizing; 0 → −1, 255 → +1, 51 → −1 + 2·51/255 = −0.6.
    assert torch.equal(x[0], torch.full((1, 4, 4), -1.0, dtype=torch.float64))
    assert torch.equal(x[1], torch.full((1, 4, 4), 1.0, dtype=torch.float64))
    torch.testing.assert_close(x[2], torch.full((1, 4, 4), -0.6, dtype=torch.float64), rtol=0, atol=1e-12)
    rgb, _ = load_data(str(tmp_path / "images"), _image_probe((3, 4, 4)), 3, seed=0)
    assert torch.equal(rgb[:, :1].expand(3, 3, 4, 4), rgb)
    with pytest.raises(UsageError, match="holds 3 samples, the audit needs 5"):
        load_data(str(tmp_path / "images"), _image_probe(), 5, seed=0)


def test_arrays_layouts_keys_and_ranges(tmp_path, x0_file):
    probe = _image_probe()
    hwc = np.arange(10 * 16, dtype=np.uint8).reshape(10, 4, 4, 1)
    x, info = load_data(x0_file(hwc, "hwc.npy"), probe, 4, seed=3)
    rows = sorted(rng.permutation(10, 3, "data")[:4].tolist())
    expected = -1 + 2 * torch.from_numpy(hwc[rows].transpose(0, 3, 1, 2)).double() / 255
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-15)
    assert info["n_available"] == 10 and info["mapping"].startswith("8-bit")
    with pytest.raises(UsageError, match=r"outside the model's data range \[-1, 1\]"):
        load_data(x0_file(np.full((4, 1, 4, 4), 3.0), "big.npy"), probe, 4, seed=0)
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 16)), b=np.ones((4, 16)))
    with pytest.raises(UsageError, match="name one as two.npz#<key>"):
        load_data(str(tmp_path / "two.npz"), probe, 4, seed=0)
    flat, _ = load_data(str(tmp_path / "two.npz") + "#b", probe, 4, seed=0)
    assert torch.equal(flat, torch.ones(4, 1, 4, 4, dtype=torch.float64))
    # Arrays of another image size are refused, never resized (images files are decoded at the model's size).
    torch.save({"x": torch.zeros(4, 1, 8, 8)}, tmp_path / "t.pt")
    with pytest.raises(UsageError, match=r"holds samples of shape \(1, 8, 8\), the model expects \(1, 4, 4\)"):
        load_data(str(tmp_path / "t.pt"), probe, 4, seed=0)
    single, _ = load_data(x0_file(np.zeros((4, 4, 4)), "hw.npy"), probe, 4, seed=0)  # [N, H, W] for one channel
    assert single.shape == (4, 1, 4, 4)
    with pytest.raises(UsageError, match="holds samples of shape"):
        load_data(x0_file(np.zeros((4, 5)), "odd.npy"), probe, 4, seed=0)
    with pytest.raises(UsageError, match="unknown data format .txt"):
        (tmp_path / "x.txt").write_text("1")
        load_data(str(tmp_path / "x.txt"), probe, 4, seed=0)
    with pytest.raises(UsageError, match="data not found"):
        load_data(str(tmp_path / "nope.npy"), probe, 4, seed=0)


def test_tables_with_pixel_columns_and_labels(tmp_path):
    import pandas as pd

    probe = _image_probe()
    pixels = np.tile(np.arange(16) * 17, (3, 1))  # 0 … 255 in steps of 17
    frame = pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(16)])
    frame.insert(0, "label", [1, 2, 3])
    frame.to_csv(tmp_path / "digits.csv", index=False)
    x, info = load_data(str(tmp_path / "digits.csv"), probe, 3, seed=0)
    torch.testing.assert_close(x[0].flatten(), torch.linspace(-1, 1, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert info["kind"] == "table"
    vec = VectorFieldProbe(lambda x, t: -x, process=OUProcess(), sample_shape=(2,), dtype=torch.float64)
    pd.DataFrame({"a": [0.1, 0.2], "b": [-0.3, 0.4]}).to_json(tmp_path / "v.jsonl", orient="records", lines=True)
    v, _ = load_data(str(tmp_path / "v.jsonl"), vec, 2, seed=0)
    torch.testing.assert_close(v, torch.tensor([[0.1, -0.3], [0.2, 0.4]], dtype=torch.float64))
    with pytest.raises(UsageError, match="has 2 numeric columns, the model's samples have 16"):
        load_data(str(tmp_path / "v.jsonl"), probe, 2, seed=0)


# ------------------------------------------------------------------------------------------ model samples


def test_sampler_converges_at_second_order_on_a_gaussian():
    """For data N(μ, c²I) the probability flow keeps z = (x − αμ)/√(α²c² + σ²) fixed, so the exact sample
    from the starting point x_T is μ + c z_T; DPM-Solver++(2M) quarters its error per doubling of steps."""
    mu, c = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.5
    probe = as_probe(GaussianMixture(mu[None], c), (2,))
    n, seed = 64, 0
    a_t, s_t = math.exp(-START_OU_T), math.sqrt(-math.expm1(-2 * START_OU_T))
    eps = torch.stack([rng.normal((2,), seed, "sampler", i, dtype=torch.float64) for i in range(n)])
    x_start = s_t * eps  # α_T · (centre of the data range, 0) + σ_T ε
    exact = mu + c * (x_start - a_t * mu) / math.sqrt(a_t**2 * c**2 + s_t**2)
    err = {k: float((sample(probe, n, seed, steps=k) - exact).abs().max()) for k in (25, 50, 100)}
    # Second order: each doubling divides the error by 4 (measured 0.26 and 0.25; ±0.05 for the
    # first-order DDIM start step, whose share shrinks as h² too).
    assert err[50] / err[25] == pytest.approx(0.25, abs=0.05)
    assert err[100] / err[50] == pytest.approx(0.25, abs=0.05)
    assert err[50] < 0.02 * c  # the default 50 steps: about 1% of the data's scale (measured 0.6e-2 / 0.5)


def test_model_samples_start_from_the_same_bits_for_any_batch_size(torch_threads):
    """The sampler's starting noise is keyed per sample: its first model call sees the same bits in any
    batches; the samples then agree within the float64 reproducibility tolerance."""
    gm = mixture()
    seen: list[torch.Tensor] = []

    def recorded(x, t):
        seen.append(x.clone())
        return gm.score(x, t)

    probe = as_probe(recorded, (3,))
    whole = sample(probe, 5, 0, steps=8, batcher=Batcher(64))
    first = seen[0]
    seen.clear()
    chunked = sample(probe, 5, 0, steps=8, batcher=Batcher(2))
    assert torch.equal(torch.cat(seen[:3]), first)  # chunks of 2, 2 and 1 rows of the first step
    # Eight ODE steps of size O(1) carry a rounding difference along without growing it by much (the
    # mixture's flow contracts towards its modes): the tolerance relative to the samples' scale.
    assert_reproducible(whole, chunked, "fp64", scale=float(whole.abs().max()))


def test_model_samples_are_cached_by_identity(tmp_path, caplog):
    cache = tmp_path / "cache"
    probe_a = as_probe(mixture(), (3,))
    probe_a.info.weights_sha256 = "a" * 64
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        x1, src = model_samples(probe_a, 4, 0, steps=8, cache_dir=cache)
        x2, _ = model_samples(probe_a, 4, 0, steps=8, cache_dir=cache)
    assert torch.equal(x1, x2) and src["kind"] == "model"
    assert sum("read from the cache" in r.message for r in caplog.records) == 1
    files = sorted(cache.rglob("*.npy"))
    assert len(files) == 1
    # Another model (other weights hash) with the same settings must not get these samples.
    gm_b = GaussianMixture(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), 0.1)
    probe_b = as_probe(gm_b, (3,))
    probe_b.info.weights_sha256 = "b" * 64
    xb, _ = model_samples(probe_b, 4, 0, steps=8, cache_dir=cache)
    assert not torch.allclose(xb, x1) and len(sorted(cache.rglob("*.npy"))) == 2
    # A key file that does not match (edited, or from another version) is never trusted.
    key_file = files[0].with_suffix(".json")
    key = json.loads(key_file.read_text())
    key["key"]["n"] = 5
    key_file.write_text(json.dumps(key, sort_keys=True))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        x3, _ = model_samples(probe_a, 4, 0, steps=8, cache_dir=cache)
    assert not any("read from the cache" in r.message for r in caplog.records)
    assert torch.equal(x3, x1)  # sampled again with the same batches and threads: the same bits
    # Samples changed after they were written (a damaged disk, an edit) fail the recorded SHA-256: they are
    # drawn again, with a warning, and the audit gets the model's true samples.
    data = bytearray(files[0].read_bytes())
    data[-8:] = np.float64(7.0).tobytes()
    files[0].write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conservcheck"):
        x4, _ = model_samples(probe_a, 4, 0, steps=8, cache_dir=cache)
    assert torch.equal(x4, x1)
    damaged = "are damaged (its SHA-256 is not the one recorded): drawing them again"
    assert any(damaged in r.message for r in caplog.records)
    assert not any("read from the cache" in r.message for r in caplog.records)
    # A probe without a weights hash is never cached.
    model_samples(as_probe(mixture(), (3,)), 4, 0, steps=8, cache_dir=tmp_path / "other")
    assert not list((tmp_path / "other").rglob("*.npy"))


def test_package_level_call_is_the_audit(tmp_path, x0_file):
    import conservcheck

    gm = mixture()
    x0 = gm.sample(4, torch.Generator().manual_seed(0)).numpy()
    kw = dict(
        paths="rotation",
        curl="none",
        times=[0.5],
        n_samples=4,
        n_points=16,
        precision="fp64",
        data=x0_file(x0),
        cache_dir=str(tmp_path / "cache"),
    )
    rep = conservcheck.audit(mixture_probe(), **kw)
    assert isinstance(rep, conservcheck.AuditReport)
    # Same function, same seed: the identical report through the module path.
    assert _comparable(rep) == _comparable(audit(mixture_probe(), **kw))
    assert rep.verdict.status == "pass"
