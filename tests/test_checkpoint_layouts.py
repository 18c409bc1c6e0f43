"""The other layouts a diffusers user publishes: fine-tunes saved with ``save_pretrained``, variant files,
sharded weights, ``.bin`` only, ``.bin`` beside ``.safetensors``, and scheduler keys diffusers has dropped.

Each row is written by diffusers' own ``save_pretrained`` (current version) into a folder, placed in a
temporary Hugging Face cache under a hub id, resolved with ``HF_HUB_OFFLINE=1`` (hub id → cache → adapter →
probe), compared with diffusers reading the same folder, and audited once through the CLI. The network is
google/ddpm-cifar10-32's published config at reduced widths (examples/published_checkpoints.py).

Tolerance: float64 x̂0 against ``DDPMScheduler.step``, 1e-6 relative (see tests/test_checkpoints.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import published_checkpoints

import conservcheck
from conservcheck import ModelLoadError
from conservcheck.adapters.resolve import load_reference

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PC = published_checkpoints()
COMMIT = "c" * 40


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _unet(seed=0):
    return PC.build_model(PC.REPOS["google/ddpm-cifar10-32"].models[0], "small", seed)


def _scheduler(**changes):
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in PC.DDPM_CIFAR10_SCHEDULER.items() if not k.startswith("_")}
    return DDPMScheduler(**{**cfg, **changes})


def _pipeline(seed=0, **scheduler):
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=_unet(seed), scheduler=_scheduler(**scheduler))


def _publish(hub_cache, repo_id, folder):
    """Put a saved folder into the cache as repo_id@main; returns (cache dir, snapshot folder)."""
    cache = hub_cache(repo_id, folder, COMMIT)
    return cache, cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT


def _files(snap):
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _check_x0(probe, unet, scheduler, ks=(10, 500, 990)):
    """The probe's x̂0 equals ``scheduler.step``'s pred_original_sample from ``unet``'s output (no clipping)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
    unet = unet.to(F64).eval()
    x = _x((2, *probe.sample_shape))
    for k in ks:
        t = probe.time_convention.to_canonical(torch.tensor(float(k), dtype=F64))
        with torch.no_grad():
            s = probe.score(x, t)
            ours = (x + probe.process.sigma(t) ** 2 * s) / probe.process.alpha(t)
            ref = sched.step(unet(x, k).sample, k, x, generator=torch.Generator().manual_seed(1)).pred_original_sample
        assert float((ours - ref).abs().max()) < 1e-6 * float(ref.abs().max()), k


@pytest.fixture
def cli_audit(tmp_path, offline):
    """``cli_audit(reference, cache)`` → JSON report of a one-loop ``conservcheck audit`` with HF_HUB_OFFLINE=1."""
    import jsonschema
    from typer.testing import CliRunner

    from conservcheck.cli.app import app

    def run(reference, cache):
        out = tmp_path / "report.json"
        args = ["audit", reference, "--cache-dir", str(cache), "--paths", "rotation", "--curl", "none"]
        args += ["--samples", "1", "--points", "4", "--sampler-steps", "2", "--time-indices", "500"]
        result = CliRunner().invoke(app, [*args, "--json", str(out)])
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text())
        jsonschema.validate(data, conservcheck.report_schema())
        assert data["model"]["revision"] == COMMIT and data["model"]["name"] == reference
        return data["model"]

    return run


def test_finetune_saved_with_save_pretrained(tmp_path, hub_cache, cli_audit):
    """A fine-tune pushed with ``save_pretrained``: unet/ and scheduler/ subfolders, safetensors."""
    from diffusers import DDPMPipeline

    folder = tmp_path / "finetune"
    _pipeline().save_pretrained(folder)
    cache, snap = _publish(hub_cache, "someone/ddpm-cifar10-finetuned", folder)
    assert _files(snap) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    probe = load_reference("someone/ddpm-cifar10-finetuned", cache_dir=cache, dtype=F64)
    d = probe.describe()
    assert d["weights_files"] == {"unet/diffusion_pytorch_model.safetensors": d["weights_sha256"]}
    assert d["weights_loader"] == "safetensors" and d["revision"] == COMMIT
    pipe = DDPMPipeline.from_pretrained(snap)
    _check_x0(probe, pipe.unet, pipe.scheduler)
    assert cli_audit("someone/ddpm-cifar10-finetuned", cache)["weights_format"] == "safetensors"


def _save_variants(folder, default=True):
    """fp16 variant files (as ``save_pretrained(variant="fp16")`` writes them), with or without the default
    weights beside them; returns the fp16 UNet."""
    pipe = _pipeline()
    if default:
        pipe.save_pretrained(folder)
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(folder, variant="fp16")
    return pipe.unet


def test_variant_files_beside_the_default_weights(tmp_path, hub_cache, cli_audit):
    from diffusers import UNet2DModel

    folder = tmp_path / "variants"
    _save_variants(folder)
    cache, snap = _publish(hub_cache, "someone/ddpm-variants", folder)
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"} <= set(
        _files(snap)
    )
    probe = load_reference("someone/ddpm-variants", cache_dir=cache, dtype=F64)
    assert probe.info.extra["weights_variant"] is None
    assert list(probe.info.extra["weights_files"]) == ["unet/diffusion_pytorch_model.safetensors"]
    fp16 = load_reference("someone/ddpm-variants", cache_dir=cache, dtype=F64, variant="fp16")
    assert fp16.info.extra["weights_variant"] == "fp16"
    assert list(fp16.info.extra["weights_files"]) == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    ref = UNet2DModel.from_pretrained(snap, subfolder="unet", variant="fp16", torch_dtype=F64)
    _check_x0(fp16, ref, _scheduler())
    with pytest.raises(ModelLoadError, match=r"no weights of variant 'bf16' \(variants present: fp16\)"):
        load_reference("someone/ddpm-variants", cache_dir=cache, variant="bf16")
    assert cli_audit("someone/ddpm-variants", cache)["weights_variant"] is None


def test_variant_files_only(tmp_path, hub_cache, cli_audit):
    """Only ``diffusion_pytorch_model.fp16.safetensors``: the one variant present is read and named."""
    from diffusers import UNet2DModel

    folder = tmp_path / "fp16only"
    _save_variants(folder, default=False)
    cache, snap = _publish(hub_cache, "someone/ddpm-fp16", folder)
    assert "unet/diffusion_pytorch_model.safetensors" not in _files(snap)
    probe = load_reference("someone/ddpm-fp16", cache_dir=cache, dtype=F64)
    assert probe.info.extra["weights_variant"] == "fp16"
    ref = UNet2DModel.from_pretrained(snap, subfolder="unet", variant="fp16", torch_dtype=F64)
    _check_x0(probe, ref, _scheduler())
    assert cli_audit("someone/ddpm-fp16", cache)["weights_variant"] == "fp16"


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_weights_with_an_index(tmp_path, hub_cache, cli_audit, variant):
    from diffusers import UNet2DModel

    folder = tmp_path / "sharded"
    pipe = _pipeline()
    if variant:
        pipe.unet.to(torch.float16)
    pipe.save_pretrained(folder, max_shard_size="2MB", variant=variant)
    cache, snap = _publish(hub_cache, "someone/ddpm-sharded", folder)
    index = f"unet/diffusion_pytorch_model.safetensors.index{'.' + variant if variant else ''}.json"
    shards = sorted(json.loads((snap / index).read_text())["weight_map"].values())
    assert len(set(shards)) > 1 and index in _files(snap)
    probe = load_reference("someone/ddpm-sharded", cache_dir=cache, dtype=F64, variant=variant)
    assert sorted(probe.info.extra["weights_files"]) == sorted({f"unet/{s}" for s in shards})
    ref = UNet2DModel.from_pretrained(snap, subfolder="unet", variant=variant, torch_dtype=F64)
    _check_x0(probe, ref, pipe.scheduler)
    if variant is None:
        assert len(cli_audit("someone/ddpm-sharded", cache)["weights_files"]) == len(set(shards))


def test_bin_only_loads_with_weights_only(tmp_path, hub_cache, cli_audit):
    """A plain state dict in ``diffusion_pytorch_model.bin``: read with torch.load(weights_only=True), no
    trust flag needed (the CLI audit runs without --trust-remote-code)."""
    from diffusers import DDPMPipeline

    folder = tmp_path / "bin"
    _pipeline().save_pretrained(folder, safe_serialization=False)
    cache, snap = _publish(hub_cache, "someone/ddpm-bin", folder)
    assert "unet/diffusion_pytorch_model.bin" in _files(snap)
    assert not any(f.endswith(".safetensors") for f in _files(snap))
    probe = load_reference("someone/ddpm-bin", cache_dir=cache, dtype=F64)
    assert probe.info.extra["weights_loader"] == "torch.load(weights_only=True)"
    assert probe.info.trust_remote_code is False
    pipe = DDPMPipeline.from_pretrained(snap)
    _check_x0(probe, pipe.unet, pipe.scheduler)
    model = cli_audit("someone/ddpm-bin", cache)
    assert model["weights_format"] == "pickle" and model["trust_remote_code"] is False


def test_bin_and_safetensors_safetensors_wins(tmp_path, hub_cache, cli_audit):
    """Both formats, with different weights in each so that the one read shows: the safetensors file."""
    from diffusers import UNet2DModel

    folder = tmp_path / "both"
    _pipeline(seed=1).save_pretrained(folder, safe_serialization=False)
    _pipeline(seed=0).save_pretrained(folder)
    cache, snap = _publish(hub_cache, "someone/ddpm-both", folder)
    assert {"unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"} <= set(_files(snap))
    probe = load_reference("someone/ddpm-both", cache_dir=cache, dtype=F64)
    assert list(probe.info.extra["weights_files"]) == ["unet/diffusion_pytorch_model.safetensors"]
    safetensors = UNet2DModel.from_pretrained(snap, subfolder="unet", use_safetensors=True, torch_dtype=F64)
    _check_x0(probe, safetensors, _scheduler())
    pickled = UNet2DModel.from_pretrained(snap, subfolder="unet", use_safetensors=False, torch_dtype=F64)
    x, k = _x((1, *probe.sample_shape)), torch.tensor([500.0], dtype=F64)
    with torch.no_grad():
        assert not torch.allclose(probe.fn(x, k), pickled(x, k).sample)  # the .bin holds other weights
    assert cli_audit("someone/ddpm-both", cache)["weights_format"] == "safetensors"


def test_old_scheduler_keys(tmp_path, hub_cache, cli_audit):
    """A fine-tune saved by diffusers 0.8 with ``predict_epsilon: false`` (x0 prediction) and ``tensor_format``:
    current diffusers ignores both keys and would read the model as predicting epsilon; the adapter maps
    predict_epsilon to prediction_type ``sample`` and records it. The UNet config lacks the keys added since
    (add_attention, resnet_time_scale_shift, …), which take their defaults."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = tmp_path / "old"
    _pipeline(prediction_type="sample").save_pretrained(folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_file.read_text())
    for key in ("prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
        cfg.pop(key, None)
    cfg.update(_diffusers_version="0.8.0", predict_epsilon=False, tensor_format="pt")
    sched_file.write_text(json.dumps(cfg))
    unet_file = folder / "unet" / "config.json"
    ucfg = json.loads(unet_file.read_text())
    for key in ("add_attention", "resnet_time_scale_shift", "attn_norm_num_groups", "class_embed_type"):
        ucfg.pop(key, None)
    unet_file.write_text(json.dumps({**ucfg, "_diffusers_version": "0.8.0"}))
    cache, snap = _publish(hub_cache, "someone/ddpm-x0-2022", folder)

    assert DDPMScheduler.from_pretrained(snap, subfolder="scheduler").config.prediction_type == "epsilon"
    probe = load_reference("someone/ddpm-x0-2022", cache_dir=cache, dtype=F64)
    d = probe.describe()
    assert d["parameterization"] == "x0" and d["prediction_type"] == "sample"
    assert d["legacy_config_keys"] == {"predict_epsilon": "false -> prediction_type sample"}
    unet = UNet2DModel.from_pretrained(snap, subfolder="unet", torch_dtype=F64)
    _check_x0(probe, unet, _scheduler(prediction_type="sample"))
    model = cli_audit("someone/ddpm-x0-2022", cache)
    assert model["parameterization"] == "x0" and model["config_diffusers_version"] == "0.8.0"


def test_conflicting_old_and_new_scheduler_keys_are_refused(tmp_path, hub_cache, offline):
    folder = tmp_path / "conflict"
    _pipeline(prediction_type="v_prediction").save_pretrained(folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "predict_epsilon": True}))
    cache, _ = _publish(hub_cache, "someone/ddpm-conflict", folder)
    with pytest.raises(ModelLoadError, match="predict_epsilon=true .* and prediction_type 'v_prediction'") as err:
        load_reference("someone/ddpm-conflict", cache_dir=cache)
    assert "\n" not in str(err.value)
