"""score_sde checkpoints: format, EMA, units of every SDE (VE / VP / sub-VP, continuous and discrete).

A checkpoint is written in score_sde's format — ``module.`` prefix, the ``sigmas`` buffer first, an EMA
shadow list that differs from the raw weights, Adam state and a step — from a tiny network of
:mod:`test_networks_score_sde` (whose layout is checked against score_sde's own classes there), and read
back through the adapter. The expected scores are score_sde's ``get_score_fn`` written out here with
``sde_lib``'s formulas (``marginal_prob``, ``discrete_betas``, ``get_sigmas``), applied to the network
holding the EMA (or raw) weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections import OrderedDict

import pytest
import torch
from test_networks_score_sde import NETS, seeded_weights

from conservcheck.adapters import score_sde
from conservcheck.adapters.resolve import load_reference
from conservcheck.adapters.score_sde import config as sde_config
from conservcheck.adapters.score_sde import network as sde_network
from conservcheck.errors import ModelLoadError, UsageError
from conservcheck.process import VPSDETime

pytestmark = pytest.mark.usefixtures("single_thread")

B_MIN, B_MAX = 0.1, 20.0


def networks(config: dict, seed: int, levels: int):
    """(raw, EMA) float64 networks of a config: seeded weights, EMA = raw + noise on every trainable tensor."""
    cfg = sde_config.config_from_dict(config)
    raw = sde_network.build(cfg, levels)
    raw.load_state_dict(seeded_weights(raw, seed))
    ema = sde_network.build(cfg, levels)
    g = torch.Generator().manual_seed(seed + 1)
    trainable = set(sde_network.trainable(raw))
    ema.load_state_dict(
        {
            k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in trainable else v
            for k, v in raw.state_dict().items()
        }
    )
    return raw.double().eval(), ema.double().eval()


def write_checkpoint(folder, config: dict, seed: int = 0, levels: int = 1000, sigmas=None, extra=None):
    """A checkpoint as score_sde's ``save_checkpoint`` writes it; returns (path, raw net, EMA net)."""
    raw, ema = networks(config, seed, levels)
    state = OrderedDict((f"module.{k}", v.float() if k != "sigmas" else v) for k, v in raw.state_dict().items())
    if sigmas is not None:
        state["module.sigmas"] = sigmas
    names = sde_network.trainable(raw)
    ema_state = ema.state_dict()
    shadow = [ema_state[n].float() for n in names]
    adam = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(s), "exp_avg_sq": torch.zeros_like(s)}
        for i, s in enumerate(shadow)
    }
    group = {
        "lr": 2e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0,
        "amsgrad": False,
        "params": list(range(len(shadow))),
    }
    ckpt = {
        "optimizer": {"state": adam, "param_groups": [group]},
        "model": state,
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
        "step": 1234,
    }
    ckpt.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_3.pth"
    torch.save(ckpt, path)
    (folder / "config.json").write_text(json.dumps(config))
    return path, raw, ema


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def log_mean_coeff(s: torch.Tensor) -> torch.Tensor:
    """sde_lib's VPSDE / subVPSDE.marginal_prob: log of the mean coefficient at SDE time s."""
    return -0.25 * s**2 * (B_MAX - B_MIN) - 0.5 * s * B_MIN


def noised(s_alpha: torch.Tensor, std: torch.Tensor, shape, centered: bool, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(std), *shape, generator=g, dtype=torch.float64)
    x0 = 2 * x0 - 1 if centered else x0
    view = (-1,) + (1,) * len(shape)
    return s_alpha.reshape(view) * x0 + std.reshape(view) * torch.randn(x0.shape, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def ve_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sde-ve"), NETS["ncsnpp_cifar10_ve"])


def _ve_inputs():
    sigma = torch.tensor([0.02, 0.5, 5.0, 40.0], dtype=torch.float64)
    return noised(torch.ones(4, dtype=torch.float64), sigma, (3, 16, 16), centered=False), sigma


def test_ve_probe_reproduces_ema_scores(ve_ckpt):
    path, raw, ema = ve_ckpt
    x, sigma = _ve_inputs()
    probe = score_sde.load(path, dtype=torch.float64)
    with torch.no_grad():
        want = ema(x, sigma)  # continuous VE: fed sigma, the output (divided by sigma) is the score
        got = probe.score(x, sigma)
        assert rel(raw(x, sigma), want) > 1e-2  # the EMA really differs from the raw weights
    # the same float64 network and weights: identical operations
    assert torch.equal(got, want)
    probe32 = score_sde.load(path)
    with torch.no_grad():
        got32 = probe32.score(x.float(), sigma.float()).double()
    assert rel(got32, want) < 1e-5  # float32 rounding of the same network
    assert probe.process.name == "ve" and probe.parameterization == "score" and probe.data_range == (0.0, 1.0)


def test_raw_weights_give_raw_scores(ve_ckpt):
    path, raw, ema = ve_ckpt
    x, sigma = _ve_inputs()
    probe = score_sde.load(path, dtype=torch.float64, weights="raw")
    with torch.no_grad():
        assert torch.equal(probe.score(x, sigma), raw(x, sigma))
    assert probe.info.extra["weights"] == "raw" and probe.info.extra["ema_decay"] is None


def test_probe_provenance(ve_ckpt):
    path, _, _ = ve_ckpt
    probe = score_sde.load(path.parent)  # a folder holding one checkpoint
    assert probe.sample_shape == (3, 16, 16)
    info = probe.info
    assert info.adapter == "score_sde" and info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.extra["step"] == 1234 and info.extra["ema_decay"] == 0.9999 and info.extra["weights"] == "ema"
    assert info.extra["native_range"] == [0.01, 50.0] and info.extra["conversion"] == "s = out"
    assert info.extra["architecture"].startswith("NCSN++") and info.extra["num_scales"] == 1000
    assert info.extra["weights_loader"] == "torch.load(weights_only=True)" and not info.trust_remote_code


def test_ve_discrete_levels(tmp_path):
    path, _, ema = write_checkpoint(tmp_path, NETS["ncsnpp_cifar10_ve_discrete"], seed=4)
    probe = score_sde.load(path, dtype=torch.float64)
    assert probe.time_convention.discrete and probe.time_convention.num_steps == 1000
    # score_sde's get_sigmas: geometric from sigma_max (index 0) to sigma_min (index N - 1)
    table = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 1000, dtype=torch.float64))
    index = torch.tensor([999, 700, 250, 0])
    sigma = table[index]
    x = noised(torch.ones(4, dtype=torch.float64), sigma, (3, 16, 16), centered=False)
    with torch.no_grad():
        want = ema(x, index)  # score_fn: labels = round((T - t)(N - 1)); the output is the score
        assert torch.equal(probe.score(x, sigma), want)
        # between levels the nearest level is used, as score_sde's samplers round the index
        between = sigma * torch.tensor([1.001, 0.999, 1.002, 0.9995], dtype=torch.float64)
        assert torch.equal(probe.score(x, between), want)
    k = probe.time_convention.from_canonical(sigma)
    assert torch.allclose(k, (999 - index).double(), rtol=0, atol=1e-9)  # native time counts from the clean end
    assert probe.info.extra["family"] == "score_sde_ve_discrete" and probe.info.extra["native_range"] == [0, 999]


def test_vp_continuous_units(tmp_path):
    path, _, ema = write_checkpoint(tmp_path, NETS["ddpmpp_cifar10_vp"], seed=3)
    probe = score_sde.load(path, dtype=torch.float64)
    assert probe.process.name == "ou" and probe.parameterization == "epsilon" and probe.data_range == (-1.0, 1.0)
    s = torch.tensor([1e-3, 0.2, 0.6, 0.95], dtype=torch.float64)
    lm = log_mean_coeff(s)
    std = torch.sqrt(1 - torch.exp(2 * lm))  # VPSDE.marginal_prob
    t = -lm  # OU time: alpha = e^{-t}
    assert torch.allclose(VPSDETime(B_MIN, B_MAX).to_canonical(s), t, rtol=1e-14)
    x = noised(torch.exp(lm), std, (3, 16, 16), centered=True)
    with torch.no_grad():
        want = -ema(x, 999 * s) / std.reshape(-1, 1, 1, 1)  # get_score_fn, continuous VP
        got = probe.score(x, t)
    # float64 throughout; the time round trip s -> t -> s costs ~1e-16 in the label
    assert rel(got, want) < 1e-12, rel(got, want)


def test_vp_discrete_units(tmp_path):
    path, _, ema = write_checkpoint(tmp_path, NETS["ddpm_cifar10_vp"], seed=5)
    probe = score_sde.load(path, dtype=torch.float64)
    assert probe.process.name == "ou" and probe.time_convention.discrete
    assert probe.info.extra["architecture"] == "DDPM (score_sde)"
    # VPSDE.discrete_betas = linspace(beta_min/N, beta_max/N, N): DDPM's linear schedule
    betas = torch.linspace(B_MIN / 1000, B_MAX / 1000, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    k = torch.tensor([0, 10, 500, 999])
    t = -0.5 * torch.log(abar[k])
    std = torch.sqrt(1 - abar[k])  # sqrt_1m_alphas_cumprod[labels]
    x = noised(torch.sqrt(abar[k]), std, (3, 8, 8), centered=True)
    with torch.no_grad():
        want = -ema(x, k.double()) / std.reshape(-1, 1, 1, 1)  # get_score_fn, discrete VP: labels = k
        got = probe.score(x, t)
    assert rel(got, want) < 1e-12, rel(got, want)


def test_subvp_units(tmp_path):
    config = {**NETS["ddpmpp_cifar10_vp"], "training": {"sde": "subvpsde", "continuous": True}}
    path, _, ema = write_checkpoint(tmp_path, config, seed=6)
    probe = score_sde.load(path, dtype=torch.float64)
    assert probe.process.name == "subvp" and probe.parameterization == "epsilon"
    s = torch.tensor([1e-3, 0.2, 0.6, 0.95], dtype=torch.float64)
    lm = log_mean_coeff(s)
    std = 1 - torch.exp(2 * lm)  # subVPSDE.marginal_prob: no square root
    t = -lm
    assert torch.allclose(probe.process.sigma(t), std, rtol=1e-14) and torch.allclose(
        probe.process.alpha(t), torch.exp(lm)
    )
    x = noised(torch.exp(lm), std, (3, 16, 16), centered=True)
    with torch.no_grad():
        want = -ema(x, 999 * s) / std.reshape(-1, 1, 1, 1)  # get_score_fn: sub-VP is always fed 999 t
        got = probe.score(x, t)
    assert rel(got, want) < 1e-12, rel(got, want)
    assert (
        probe.info.extra["family"] == "score_sde_subvp" and "1 - exp(-int_0^s beta)" in probe.info.extra["conversion"]
    )


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
    wrong = torch.exp(torch.linspace(math.log(348.0), math.log(0.01), 1000, dtype=torch.float64))
    path, _, _ = write_checkpoint(tmp_path, NETS["ncsnpp_cifar10_ve"], sigmas=wrong)
    with pytest.raises(ModelLoadError, match="sigma from 0.01 to 348"):
        score_sde.load(path)
    config = {**NETS["ncsnpp_cifar10_ve"], "model": {**NETS["ncsnpp_cifar10_ve"]["model"], "num_scales": 2000}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="1000 noise scales, the config says model.num_scales = 2000"):
        score_sde.load(write_checkpoint(tmp_path / "n", NETS["ncsnpp_cifar10_ve"])[0], config=str(tmp_path / "c.json"))


def test_unpickling_needs_trust(tmp_path):
    path, _, _ = write_checkpoint(tmp_path, NETS["ncsnpp_cifar10_ve"], extra={"args": argparse.Namespace(lr=1e-4)})
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        score_sde.load(path)
    probe = score_sde.load(path, trust_remote_code=True)
    assert probe.info.trust_remote_code and probe.info.extra["weights_loader"] == "torch.load(weights_only=False)"


#: (modules, parameters) of score_sde's own classes built from the released configs at full size
#: (counted once with score_sde_pytorch cb1f359; the EMA lists have parameters minus the Fourier W).
RELEASED_SIZES = {
    "ve/cifar10_ncsnpp": (58, 62_693_251),
    "ve/cifar10_ncsnpp_continuous": (59, 62_758_915),
    "ve/cifar10_ncsnpp_deep_continuous": (95, 107_587_075),
    "vp/ddpm/cifar10": (37, 35_218_947),
    "vp/ddpm/cifar10_continuous": (37, 35_218_947),
    "vp/cifar10_ddpmpp": (55, 61_804_419),
    "vp/cifar10_ddpmpp_continuous": (55, 61_804_419),
    "vp/cifar10_ddpmpp_deep_continuous": (91, 106_632_579),
    "subvp/cifar10_ddpm_continuous": (37, 35_218_947),
    "subvp/cifar10_ddpmpp_continuous": (55, 61_804_419),
    "subvp/cifar10_ddpmpp_deep_continuous": (91, 106_632_579),
    "ve/bedroom_ncsnpp_continuous": (77, 65_574_549),
    "ve/church_ncsnpp_continuous": (77, 65_574_549),
    "ve/ffhq_ncsnpp_continuous": (70, 105_785_896),
    "ve/ffhq_256_ncsnpp_continuous": (77, 65_574_549),
    "ve/celebahq_256_ncsnpp_continuous": (77, 65_574_549),
}


@pytest.mark.parametrize("name", sde_config.RELEASED, ids=lambda name: name.replace("/", "-"))
def test_released_presets_build_their_architecture(name):
    cfg, _ = sde_config.read_config(name)
    with torch.device("meta"):
        net = sde_network.build(cfg, cfg.num_scales or 1000)
    modules, params = RELEASED_SIZES[sde_config.ALIASES.get(name, name)]
    assert len(net.all_modules) == modules and sum(p.numel() for p in net.parameters()) == params


def test_config_dump_of_score_sde_reads_as_its_preset():
    # vp/cifar10_ddpmpp_continuous's config.to_dict() as score_sde writes it (the sections that matter)
    dump = json.loads(
        '{"training": {"batch_size": 128, "sde": "vpsde", "continuous": true, "reduce_mean": true},'
        ' "data": {"dataset": "CIFAR10", "image_size": 32, "centered": true, "num_channels": 3},'
        ' "model": {"sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0,'
        ' "dropout": 0.1, "embedding_type": "positional", "name": "ncsnpp", "scale_by_sigma": false,'
        ' "ema_rate": 0.9999, "normalization": "GroupNorm", "nonlinearity": "swish", "nf": 128,'
        ' "ch_mult": [1, 2, 2, 2], "num_res_blocks": 4, "attn_resolutions": [16], "resamp_with_conv": true,'
        ' "conditional": true, "fir": false, "fir_kernel": [1, 3, 3, 1], "skip_rescale": true,'
        ' "resblock_type": "biggan", "progressive": "none", "progressive_input": "none",'
        ' "progressive_combine": "sum", "attention_type": "ddpm", "init_scale": 0.0, "fourier_scale": 16,'
        ' "conv_size": 3}, "optim": {"lr": 0.0002}}'
    )
    assert sde_config.config_from_dict(dump) == sde_config.read_config("vp/cifar10_ddpmpp_continuous")[0]
    # released folder names and unambiguous short names resolve; ambiguous ones are named
    assert sde_config.read_config("vp/cifar10_ddpm")[0] == sde_config.read_config("vp/ddpm/cifar10")[0]
    assert sde_config.read_config("ffhq_1024_ncsnpp_continuous")[0].image_size == 1024
    with pytest.raises(UsageError, match="ambiguous.*subvp/cifar10_ddpmpp_continuous"):
        sde_config.read_config("cifar10_ddpmpp_continuous")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"name": "ncsnv2"}}, "model.name 'ncsnv2' is not supported"),
        ({"model": {"progressive": "residual"}}, "progressive='residual', which needs an upsampling layer"),
        ({"training": {"sde": "subvpsde", "continuous": False}}, "sub-VP models in continuous time only"),
        ({"training": {"sde": "vesde", "continuous": False}}, "Fourier time embedding needs continuous training"),
    ],
)
def test_unsupported_configs_are_refused(ve_ckpt, tmp_path, change, message):
    base = NETS["ncsnpp_cifar10_ve"]
    config = {k: {**v, **change.get(k, {})} for k, v in base.items()}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        score_sde.load(ve_ckpt[0], config=str(tmp_path / "c.json"))


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
    deeper = {**NETS["ncsnpp_cifar10_ve"], "model": {**NETS["ncsnpp_cifar10_ve"]["model"], "num_res_blocks": 2}}
    (tmp_path / "c.json").write_text(json.dumps(deeper))
    with pytest.raises(ModelLoadError, match="does not match the config"):
        score_sde.load(lone, config=str(tmp_path / "c.json"))
    with pytest.raises(ModelLoadError, match="does not match the config"):
        score_sde.load(lone, config="ve/cifar10_ncsnpp_continuous")  # the full-size network


def test_native_network_supports_forward_mode_autodiff(ve_ckpt):
    from conservcheck.geometry import jacobian

    probe = score_sde.load(ve_ckpt[0], dtype=torch.float64)
    x, sigma = _ve_inputs()
    choice = jacobian.select_strategy(probe.score, x[:2], sigma[:2])
    assert not choice.rejected and choice.name == "jvp", choice


def test_subvp_checkpoint_audit_end_to_end(tmp_path, audit_end_to_end):
    config = {**NETS["ddpmpp_cifar10_vp"], "training": {"sde": "subvpsde", "continuous": True}}
    path, _, _ = write_checkpoint(tmp_path / "subvp", config, seed=7)
    data = audit_end_to_end(path, "--sigmas", "0.1,0.5")
    assert data["model"]["adapter"] == "score_sde" and data["process"]["name"] == "subvp"
    # canonical time t = -1/2 log(1 - sigma) for sub-VP
    assert [p["t"] for p in data["time_points"]] == pytest.approx([-0.5 * math.log(0.9), -0.5 * math.log(0.5)])
    assert data["verdict"]["status"] in ("pass", "violation")


def test_discrete_ve_checkpoint_audit_end_to_end(tmp_path, audit_end_to_end):
    path, _, _ = write_checkpoint(tmp_path / "smld", NETS["ncsnpp_cifar10_ve_discrete"], seed=8)
    data = audit_end_to_end(path, "--time-indices", "100,800")
    assert data["model"]["adapter"] == "score_sde" and data["process"]["name"] == "ve"
    sigmas = [0.01 * 5000 ** (k / 999) for k in (100, 800)]
    assert [p["index"] for p in data["time_points"]] == [100, 800]
    assert [p["t"] for p in data["time_points"]] == pytest.approx(sigmas, rel=1e-12)
