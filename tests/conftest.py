"""Shared fixtures: tiny diffusers models built with the real classes and saved with ``save_pretrained``.

Pixel DDPM UNets are shaped like google/ddpm-cifar10-32's (Down, AttnDown, Down, Down blocks; positional
time embedding with freq_shift 1, flip_sin_to_cos false) and NCSN++ UNets like
google/ncsnpp-celebahq-256's (Skip blocks, Fourier time embedding, center_input_sample), both shrunk to
8×8 or 16×16 images and 1–5·10⁵ parameters. Weights are random (seeded): the checks compare conversions,
not sample quality.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

import conservcheck


def tiny_ddpm_unet(seed: int = 0, sample_size: int = 16, in_channels: int = 3, out_channels: int | None = None):
    """A UNet2DModel shaped like google/ddpm-cifar10-32's, with 8–16 channels."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
    )


def tiny_ncsnpp_unet(seed: int = 0):
    """A UNet2DModel shaped like google/ncsnpp-celebahq-256's: Skip blocks, Fourier σ embedding, 8×8."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32, 32),  # Skip blocks' attention uses 32 groups
        norm_num_groups=None,
        center_input_sample=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
        attention_head_dim=None,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_eps=1e-6,
        time_embedding_type="fourier",
        mid_block_scale_factor=2**0.5,
    )


@pytest.fixture(scope="session")
def ddpm_folder(tmp_path_factory):
    """Factory: ``ddpm_folder(beta_schedule, prediction_type, **scheduler_kw)`` → a saved DDPMPipeline folder.

    The scheduler is DDPMScheduler with clip_sample=False (the probe's x̂0 is unclipped); folders are
    cached per argument set for the session.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    made: dict[tuple, pathlib.Path] = {}

    def make(beta_schedule: str = "linear", prediction_type: str = "epsilon", seed: int = 0, **kw) -> pathlib.Path:
        key = (beta_schedule, prediction_type, seed, tuple(sorted(kw.items())))
        if key not in made:
            out_channels = 6 if kw.get("variance_type") in ("learned", "learned_range") else None
            sched = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False, **kw)
            folder = tmp_path_factory.mktemp(f"ddpm-{beta_schedule}-{prediction_type}")
            DDPMPipeline(unet=tiny_ddpm_unet(seed, out_channels=out_channels), scheduler=sched).save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def ncsnpp_folder(tmp_path_factory) -> pathlib.Path:
    """A saved ScoreSdeVePipeline folder (tiny NCSN++ UNet, ScoreSdeVeScheduler σ ∈ [0.01, 50])."""
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

    folder = tmp_path_factory.mktemp("ncsnpp")
    sched = ScoreSdeVeScheduler(num_train_timesteps=2000, sigma_min=0.01, sigma_max=50.0, snr=0.15)
    ScoreSdeVePipeline(unet=tiny_ncsnpp_unet(), scheduler=sched).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def latent_folder(tmp_path_factory):
    """Factory: ``latent_folder("vq" | "kl")`` → a saved latent pipeline folder.

    ``vq``: LDMPipeline (VQModel 16×16 images → 3×8×8 latents, UNet2DModel, DDIMScheduler), as
    CompVis/ldm-celebahq-256. ``kl``: AutoencoderKL (4×8×8 latents) in ``vae/`` with a UNet2DModel and a
    DDPMScheduler, components saved one by one beside a hand-written model_index.json. Both autoencoders
    use scaling_factor 0.5 so a missing or doubled scaling shows.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, LDMPipeline, VQModel

    made: dict[str, pathlib.Path] = {}
    blocks = dict(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )

    def unet(channels: int):
        from diffusers import UNet2DModel

        torch.manual_seed(1)
        return UNet2DModel(
            sample_size=8,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=1,
            block_out_channels=(8, 16, 16),
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None,
            freq_shift=1,
            flip_sin_to_cos=False,
        )

    def make(kind: str = "vq") -> pathlib.Path:
        if kind in made:
            return made[kind]
        folder = tmp_path_factory.mktemp(f"latent-{kind}")
        torch.manual_seed(2)
        if kind == "vq":
            vq = VQModel(latent_channels=3, vq_embed_dim=3, num_vq_embeddings=64, **blocks)
            sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
            LDMPipeline(vqvae=vq, unet=unet(3), scheduler=sched).save_pretrained(folder)
        else:
            vae = AutoencoderKL(latent_channels=4, **blocks)
            vae.save_pretrained(folder / "vae")
            unet(4).save_pretrained(folder / "unet")
            DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(folder / "scheduler")
            index = {
                "_class_name": "DiffusionPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
            (folder / "model_index.json").write_text(json.dumps(index))
        made[kind] = folder
        return folder

    return make


def published_checkpoints():
    """``examples/published_checkpoints.py`` as a module: the published repositories' layouts and configs,
    and the hub-cache writer (:func:`add_to_cache`)."""
    name = "published_checkpoints"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def hub_cache(tmp_path):
    """Factory: ``hub_cache(repo_id, source, commit, refs=("main",))`` → cache dir (tmp_path / "hub").

    Writes the Hugging Face cache layout huggingface_hub itself produces
    (``published_checkpoints.add_to_cache``): ``models--owner--name/blobs/<sha256>`` holding each file's
    bytes, ``snapshots/<commit>/<path>`` symbolic links to those blobs (plain copies where the platform has
    no symlinks) and ``refs/<ref>`` files holding the commit hash. ``source`` is a folder or a mapping of
    repository paths to bytes.
    """
    cache = tmp_path / "hub"
    module = published_checkpoints()

    def add(repo_id: str, source, commit: str, refs: tuple[str, ...] = ("main",)) -> pathlib.Path:
        module.add_to_cache(cache, repo_id, source, commit, refs)
        return cache

    return add


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread, then restore the setting.

    Tiny models gain nothing from threads, and on a shared CPU thread hand-offs cost more than the
    work (a 16×16 UNet call: ~25 ms on one thread, ~1 s on two contended ones).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def audit_end_to_end(tmp_path):
    """``audit_end_to_end(reference, *flags)`` → the JSON report of a tiny ``conservcheck audit`` run.

    Runs the real command (typer's runner over the app) with two samples, eight loop nodes, rotation
    loops and a 2×2 curl block at the model's default time points, x0 drawn by a 4-step sampler; asserts
    exit code 0 and validates the report against the packaged schema.
    """

    import jsonschema
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    schema = conservcheck.report_schema()

    def run(reference, *flags):
        out = tmp_path / "report.json"
        args = [
            "audit",
            str(reference),
            "--paths",
            "rotation",
            "--curl",
            "subjacobian",
            "--block",
            "2",
            "--samples",
            "2",
            "--points",
            "8",
            "--sampler-steps",
            "4",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
            *map(str, flags),
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text())
        jsonschema.validate(data, schema)
        return data

    return run


def _injected_error_module():
    """examples/ci/injected_error.py (the checkpoint with an injected rotation) as a module."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ci" / "injected_error.py"
    spec = importlib.util.spec_from_file_location("injected_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The settings of the real audits the baseline, CI and HTML tests compare: rotation loops on the embedded
#: funnel (an MLP, seconds on a CPU), 16 samples of 32 nodes at the default six time points.
FUNNEL_AUDIT = dict(paths="rotation", curl="none", n_samples=16, n_points=32)


@pytest.fixture(scope="session")
def funnel_reports(tmp_path_factory):
    """Real JSON reports: ``seed0`` and ``seed1`` of the embedded funnel, ``injected`` of the funnel with an
    injected non-conservative error (examples/ci/injected_error.py), seed 0; all with :data:`FUNNEL_AUDIT`."""
    folder = tmp_path_factory.mktemp("funnel-reports")
    cache = folder / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = {}
        for name, model, seed in (
            ("seed0", "embedded:funnel", 0),
            ("seed1", "embedded:funnel", 1),
            ("injected", _injected_error_module().funnel_rotated(), 0),
        ):
            report = conservcheck.audit(model, seed=seed, cache_dir=str(cache), **FUNNEL_AUDIT)
            paths[name] = folder / f"{name}.json"
            report.to_json(paths[name])
    finally:
        torch.set_num_threads(before)
    return paths


# ------------------------------------------------------------------------------------ reproducibility


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Run a test under 1 and under 2 intra-op threads, then restore the setting.

    Kernels choose their blocking, and reductions their split, by shape and by thread count: a
    batch-invariance or shard test run under both shows a shape- or thread-dependent kernel on any
    machine with two cores, not only on the one whose default happens to expose it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


#: Counts and indices beside a number say nothing about its scale.
COUNTS = frozenset({"sample", "time_index", "index", "n", "n_points", "n_evals"})


def _floats_outside(a, b, tol, scale: float, where: str, out: list[str], ctx: dict) -> None:
    """Collect the places where JSON values a, b differ beyond ``tol`` (see :func:`assert_reproducible`)."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (dict, list, float)):
        if a != b:
            out.append(f"{where}: {a!r} vs {b!r}")
        return
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            out.append(f"{where}: {a!r} vs {b!r}")
        elif a != b and not tol.allows(float(a), float(b), scale):
            out.append(f"{where}: {a!r} vs {b!r} (allowed ±{tol.bound(float(a), scale):.2g})")
        return
    if type(a) is not type(b) or len(a) != len(b) or (isinstance(a, dict) and a.keys() != b.keys()):
        out.append(f"{where}: {str(a)[:120]} vs {str(b)[:120]}")
        return
    items = list(a.items()) if isinstance(a, dict) else list(enumerate(a))
    if isinstance(a, dict) and "diagnostic" in a:
        # A row, summary row, unit or check of one unit: the tolerance of that unit's Jacobian strategy.
        unit = (a.get("field", "model"), a["diagnostic"], a.get("variant"), a.get("time_key"))
        tol = ctx["tolerance"](ctx["strategy"].get(unit))
    # A number's rounding noise is relative to the numbers it is computed from: a conservative field's
    # signed circulation is noise of the size of ∮|s||dy| · 2^-52, not of its own size. Its row (or dict)
    # holds those numbers; a scale-free headline metric keeps atol as it is (scale 1).
    numbers = [
        abs(v)
        for k, v in items
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k not in COUNTS
    ]
    inner = max([1.0, *numbers])
    headline = ctx["headline"]
    is_summary_row = isinstance(a, dict) and a.get("metric") in headline
    for k, v in items:
        own = 1.0 if (is_summary_row or k in headline) else inner
        _floats_outside(v, b[k], tol, own, f"{where}.{k}" if where else str(k), out, ctx)


def assert_reproducible(a, b, precision: str = "fp64", scale=1.0, strategy: str | None = None) -> None:
    """Assert that ``b`` is ``a`` within the documented reproducibility tolerance.

    For two computations of the same numbers with different batch sizes, loop chunkings, shard splits or
    thread counts (conservcheck.report.reproducibility, docs/report.md#reproducibility): kernels then sum
    in a different order, so the promise is |a − b| ≤ rtol · |a| + atol · scale with the (rtol, atol) of
    ``precision`` — divided by the finite-difference step for ``strategy="fd"`` — not equality. ``scale``
    (a number or a tensor broadcasting against ``a``) is the magnitude the values are rounding noise of:
    1 for a scale-free metric, ∮|s||dy| for a circulation.

    ``a`` and ``b`` are tensors / arrays (compared element-wise), or report dicts (``AuditReport.to_dict()``
    without ``run``): every non-float value must be equal, the headline metrics (per-sample columns and
    their summary rows and checks) must meet the promise as it is stated, with each curl unit's own
    Jacobian strategy, and every other number must meet it with atol relative to the largest number of
    its row.
    """
    from conservcheck import diagnostics
    from conservcheck.report.reproducibility import tolerance

    if isinstance(a, dict):
        ctx = {
            "headline": frozenset(m for spec in diagnostics.registered().values() for m in spec.headline.values()),
            "strategy": {
                (u["field"], u["diagnostic"], u["variant"], u["time_key"]): u.get("meta", {}).get("strategy")
                for u in a.get("units", [])
            },
            "tolerance": lambda s: tolerance(precision, s),
        }
        rows = []
        a, b = dict(a), dict(b)
        if "rows" in a and "rows" in b and "columns" in a["rows"]:
            # Per-sample rows: a dict per row, so a headline column is found by its name.
            cols = a["rows"]["columns"]
            if len(a["rows"]["data"]) != len(b["rows"]["data"]) or cols != b["rows"]["columns"]:
                raise AssertionError(f"rows differ in shape: {len(a['rows']['data'])} vs {len(b['rows']['data'])}")
            rows = [
                (i, dict(zip(cols, ra)), dict(zip(cols, rb)))
                for i, (ra, rb) in enumerate(zip(a["rows"]["data"], b["rows"]["data"]))
            ]
            a.pop("rows"), b.pop("rows")
        out: list[str] = []
        _floats_outside(a, b, tolerance(precision), 1.0, "", out, ctx)
        for i, ra, rb in rows:
            _floats_outside(ra, rb, tolerance(precision), 1.0, f"rows[{i}]", out, ctx)
        assert not out, f"{len(out)} values differ beyond the {precision} tolerance: " + "; ".join(out[:5])
        return
    tol = tolerance(precision, strategy)
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    assert ta.shape == tb.shape and ta.dtype == tb.dtype, f"{ta.shape} {ta.dtype} vs {tb.shape} {tb.dtype}"
    dev = (ta.double() - tb.double()).abs()
    allowed = tol.rtol * ta.double().abs() + tol.atol * torch.as_tensor(scale, dtype=torch.float64)
    bad = ~((dev <= allowed) | (ta == tb) | (ta.isnan() & tb.isnan()))
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {ta.numel()} values differ beyond the {precision} tolerance "
        f"(largest deviation {float(dev.max()):.3g}, allowed there {float(allowed[bad].min()):.3g})"
    )
