"""score_sde checkpoints: format, EMA, key map and units.

A tiny NCSN++ is built as a diffusers ``UNet2DModel`` (the real class, through the adapter's
:func:`build_unet`), written in score_sde's checkpoint format through the inverse key map — ``module.``
prefix, a ``sigmas`` buffer, an EMA shadow list that differs from the raw weights, an optimizer stub and
a step — and read back through the adapter. The reference is the same UNet2DModel holding the EMA (or
raw) weights directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from conservcheck.adapters import score_sde
from conservcheck.adapters.resolve import load_reference
from conservcheck.adapters.score_sde import config as sde_config
from conservcheck.adapters.score_sde import convert as sde_convert
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.process import VPSDETime

pytestmark = pytest.mark.usefixtures("single_thread")

# 32/64 channels: diffusers' attention up-block builds its resnet norms with 32 groups, so attention
# levels (and the next finer level) need widths divisible by 32
TINY = {
    "training": {"sde": "vesde", "continuous": True},
    "data": {"image_size": 16, "num_channels": 3, "centered": False},
    "model": {
        "nf": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [8],
        "sigma_max": 50.0,
        "sigma_min": 0.01,
    },
}
TINY_VP = {
    "training": {"sde": "vpsde", "continuous": True},
    "data": {"image_size": 16, "num_channels": 3, "centered": True},
    "model": {"nf": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "scale_by_sigma": False},
}


def to_original(state: Mapping[str, Tensor], pairs: list[sde_convert.KeyPair]) -> OrderedDict[str, Tensor]:
    """diffusers keys → NCSN++ keys, in NCSN++ parameter order: a checkpoint as score_sde writes it."""
    return OrderedDict((p.original, state[p.diffusers].t() if p.transpose else state[p.diffusers]) for p in pairs)


def _states(cfg: sde_config.SDEConfig, seed: int) -> tuple[dict, dict]:
    """(raw, EMA) diffusers state dicts: seeded weights, and EMA = raw + noise on every trainable tensor."""
    torch.manual_seed(seed)
    unet = sde_convert.build_unet(cfg)
    raw = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    ema = {k: v + 0.05 * torch.randn_like(v) if k in trainable else v for k, v in raw.items()}
    return raw, ema


def write_checkpoint(folder, config: dict, seed: int = 0, sigmas=None, extra=None):
    """A score_sde-format checkpoint of a tiny NCSN++; returns (path, raw state, EMA state)."""
    cfg = sde_config.config_from_dict(config)
    raw, ema = _states(cfg, seed)
    pairs = sde_convert.key_map(cfg, raw)
    if sigmas is None:
        sigmas = torch.exp(
            torch.linspace(math.log(cfg.sigma_max or 50.0), math.log(cfg.sigma_min), 1000, dtype=torch.float64)
        )
    # NCSNpp registers the sigmas buffer before its module list: it comes first in the state dict
    model = OrderedDict([("module.sigmas", sigmas)])
    model.update((f"module.{k}", v) for k, v in to_original(raw, pairs).items())
    ema_orig = to_original(ema, pairs)
    shadow = [ema_orig[p.original] for p in pairs if p.trainable]
    group = {
        "lr": 2e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0,
        "amsgrad": False,
        "params": list(range(len(shadow))),
    }
    optimizer = {"state": {}, "param_groups": [group]}
    ckpt = {
        "optimizer": optimizer,
        "model": model,
        "ema": {"decay": 0.999, "num_updates": 10, "shadow_params": shadow},
        "step": 1234,
    }
    ckpt.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_3.pth"
    torch.save(ckpt, path)
    (folder / "config.json").write_text(json.dumps(config))
    return path, raw, ema


def reference(config: dict, state: dict, dtype=torch.float64):
    unet = sde_convert.build_unet(sde_config.config_from_dict(config))
    unet.load_state_dict(state)
    return unet.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


@pytest.fixture(scope="module")
def ve_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sde-ve"), TINY)


def _ve_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.02, 0.5, 5.0, 40.0], dtype=dtype)
    x0 = torch.rand(4, 3, 16, 16, generator=g, dtype=dtype)
    return x0 + sigma[:, None, None, None] * torch.randn(4, 3, 16, 16, generator=g, dtype=dtype), sigma


def test_probe_reproduces_ema_scores(ve_ckpt):
    path, raw, ema = ve_ckpt
    x, sigma = _ve_inputs()
    probe = score_sde.load(path, dtype=torch.float64)
    with torch.no_grad():
        want = reference(TINY, ema)(x, sigma).sample  # VE NCSN++: the output is the score
        got = probe.score(x, sigma)
        raw_scores = reference(TINY, raw)(x, sigma).sample
    # same float32 weights in float64; only the attention kernel differs (bmm vs fused SDPA): ~1e-16
    assert rel(got, want) < 1e-12
    assert rel(raw_scores, want) > 1e-2  # the EMA really differs from the raw weights
    probe32 = score_sde.load(path)
    with torch.no_grad():
        got32 = probe32.score(x.float(), sigma.float())
        want32 = reference(TINY, ema, torch.float32)(x.float(), sigma.float()).sample
    assert rel(got32, want32) < 1e-5  # float32 rounding of two attention kernels


def test_raw_weights_give_raw_scores(ve_ckpt):
    path, raw, ema = ve_ckpt
    x, sigma = _ve_inputs()
    probe = score_sde.load(path, dtype=torch.float64, weights="raw")
    with torch.no_grad():
        got = probe.score(x, sigma)
        assert rel(got, reference(TINY, raw)(x, sigma).sample) < 1e-12
        assert rel(got, score_sde.load(path, dtype=torch.float64).score(x, sigma)) > 1e-2
    assert probe.info.extra["weights"] == "raw"


def test_probe_units_and_provenance(ve_ckpt):
    path, _, _ = ve_ckpt
    probe = score_sde.load(path.parent)  # a folder holding one checkpoint
    assert probe.process.name == "ve" and probe.parameterization == "score"
    assert probe.sample_shape == (3, 16, 16) and probe.data_range == (0.0, 1.0)
    info = probe.info
    assert info.adapter == "score_sde" and info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.extra["step"] == 1234 and info.extra["ema_decay"] == 0.999 and info.extra["weights"] == "ema"
    assert info.extra["native_range"] == [0.01, 50.0] and info.extra["conversion"] == "s = out"
    assert info.extra["weights_loader"] == "torch.load(weights_only=True)" and not info.trust_remote_code


def test_vp_checkpoint_units(tmp_path):
    path, _, ema = write_checkpoint(tmp_path, TINY_VP, seed=3)
    probe = score_sde.load(path, dtype=torch.float64)
    assert probe.process.name == "ou" and probe.parameterization == "epsilon" and probe.data_range == (-1.0, 1.0)
    s = torch.tensor([0.01, 0.2, 0.6, 0.95], dtype=torch.float64)
    # score_sde's VPSDE.marginal_prob, written out: log mean coefficient and std at SDE time s
    log_mean = -0.25 * s**2 * (20.0 - 0.1) - 0.5 * s * 0.1
    std = torch.sqrt(1 - torch.exp(2 * log_mean))
    t = -log_mean  # OU time: alpha = e^{-t}
    assert torch.allclose(VPSDETime(0.1, 20.0).to_canonical(s), t, rtol=1e-14)
    g = torch.Generator().manual_seed(2)
    x = torch.exp(log_mean)[:, None, None, None] * (2 * torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64) - 1)
    x = x + std[:, None, None, None] * torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        fed = 999 * s
        # UNet2DModel's Fourier embedding divides by the fed time; NCSN++ without scale_by_sigma does not
        net_out = reference(TINY_VP, ema)(x, fed).sample * fed[:, None, None, None]
        want = -net_out / std[:, None, None, None]  # score_sde's score_fn for continuous VP
        got = probe.score(x, t)
    # float64 throughout; the time round trip s -> t -> s is exact to ~1e-16
    assert rel(got, want) < 1e-12


def test_reference_resolves_to_score_sde(ve_ckpt):
    probe = load_reference(str(ve_ckpt[0]))
    assert probe.info.adapter == "score_sde" and probe.info.reference == str(ve_ckpt[0])


def test_detect(ve_ckpt, ncsnpp_folder, tmp_path):
    path, _, _ = ve_ckpt
    assert score_sde.detect(path) and score_sde.detect(path.parent)
    assert not score_sde.detect(ncsnpp_folder)  # a diffusers folder
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    assert not score_sde.detect(other) and not score_sde.detect(tmp_path / "missing.pth")


def test_sigma_buffer_must_match_config(tmp_path):
    wrong = torch.exp(torch.linspace(math.log(348.0), math.log(0.01), 2000, dtype=torch.float64))
    path, _, _ = write_checkpoint(tmp_path, TINY, sigmas=wrong)
    with pytest.raises(ModelLoadError, match="sigma from 0.01 to 348"):
        score_sde.load(path)


def test_unpickling_needs_trust(tmp_path):
    path, _, _ = write_checkpoint(tmp_path, TINY, extra={"args": argparse.Namespace(lr=1e-4)})
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        score_sde.load(path)
    probe = score_sde.load(path, trust_remote_code=True)
    assert probe.info.trust_remote_code and probe.info.extra["weights_loader"] == "torch.load(weights_only=False)"


def test_presets_match_released_architectures():
    # parameter counts and module-list lengths of score_sde's own NCSNpp built from these configs
    for name, n_modules, n_params, sigma_max in (
        ("ve/celebahq_256_ncsnpp_continuous", 77, 65_574_549, 348.0),
        ("ve/ffhq_ncsnpp_continuous", 70, 105_785_896, 1348.0),
    ):
        cfg, _ = sde_config.read_config(name)
        assert cfg.sigma_max == sigma_max and cfg.sigma_min == 0.01
        assert len(sde_convert.module_plan(cfg)) == n_modules
        with torch.device("meta"):
            unet = sde_convert.build_unet(cfg)
        assert sum(p.numel() for p in unet.parameters()) == n_params
        assert len(sde_convert.key_map(cfg, unet.state_dict())) == len(unet.state_dict())
    assert sde_config.read_config("ffhq_256_ncsnpp_continuous")[0].sigma_max == 348.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("ve/cifar10_ncsnpp_continuous", "progressive='none' has no diffusers UNet2DModel equivalent"),
        ("vp/cifar10_ddpmpp_continuous", "progressive='none' has no diffusers UNet2DModel equivalent"),
        ({**TINY, "model": {**TINY["model"], "progressive_input": "residual"}}, "progressive_input='residual'"),
        ({**TINY, "training": {"sde": "subvpsde"}}, "sde 'subvpsde' is not supported"),
    ],
)
def test_unconvertible_configs_are_refused(ve_ckpt, tmp_path, config, message):
    source = config if isinstance(config, str) else str(_write(tmp_path / "c.json", config))
    with pytest.raises(ModelLoadError, match=message):
        score_sde.load(ve_ckpt[0], config=source)


def test_config_errors(ve_ckpt, tmp_path):
    path, _, _ = ve_ckpt
    lone = tmp_path / "checkpoint_9.pth"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match="no config"):
        score_sde.load(lone)
    with pytest.raises(UsageError, match="neither a file nor a preset"):
        score_sde.load(lone, config="cifar11")
    with pytest.raises(UsageError, match="weights"):
        score_sde.load(path, weights="best")
    with pytest.raises(ModelLoadError, match="does not match the config"):
        score_sde.load(
            lone, config=str(_write(tmp_path / "c.json", {**TINY, "model": {**TINY["model"], "num_res_blocks": 2}}))
        )


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_checkpoint_audit_end_to_end(ve_ckpt, audit_end_to_end):
    path, _, _ = ve_ckpt
    data = audit_end_to_end(path, "--sigmas", "0.1,1")
    assert data["model"]["adapter"] == "score_sde" and data["process"]["name"] == "ve"
    assert [p["t"] for p in data["time_points"]] == [0.1, 1.0]  # canonical VE time is σ
    assert data["verdict"]["status"] in ("pass", "violation")
