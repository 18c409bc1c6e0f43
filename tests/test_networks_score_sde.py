"""Our NCSN++ / DDPM++ / DDPM against score_sde_pytorch's own networks, and against diffusers' UNet2DModel.

``tests/data/score_sde_reference.safetensors`` holds what score_sde's classes (``models/ncsnpp.py``,
``models/ddpm.py`` at commit cb1f359, run once on CPU with their native ``upfirdn2d`` fallback) output for
the tiny networks of :data:`NETS`, loaded with the weights of :func:`seeded_weights` — strict
``load_state_dict``, so the parameter names are theirs — at the inputs stored beside. Together the nets
cover every code path of the released configs and every other network score_sde's code can run:
Fourier and positional embeddings, the σ-table division of discrete VE, ``progressive_input`` none /
residual / input_skip (sum and cat), ``progressive`` none / output_skip, BigGAN and DDPM blocks, FIR and
naive resampling, with and without resampling convolutions, four nonlinearities, unconditional, centred
and [0, 1] data, score_sde's DDPM.

No code of score_sde is in this repository; the fixture is its output (x, labels, outputs; 238 KB).
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file, safe_open

from conservcheck.adapters.score_sde import config as sde_config
from conservcheck.adapters.score_sde import convert as sde_convert
from conservcheck.adapters.score_sde import network as sde_network
from conservcheck.errors import ModelLoadError
from conservcheck.networks import fir
from conservcheck.networks.ncsnpp import NCSNpp

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURE = pathlib.Path(__file__).parent / "data" / "score_sde_reference.safetensors"


def _cfg(sde: str, continuous: bool, data: dict, **model) -> dict:
    return {"training": {"sde": sde, "continuous": continuous}, "data": data, "model": model}


_SMALL = dict(nf=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8])
_DATA_01 = {"image_size": 16, "num_channels": 3, "centered": False}
_DATA_11 = {"image_size": 16, "num_channels": 3, "centered": True}

#: Tiny networks in score_sde's config layout, named after the released configs whose structure they keep.
NETS: dict[str, dict] = {
    # ve/cifar10_ncsnpp_continuous: residual input pyramid, FIR, Fourier embedding, ÷σ
    "ncsnpp_cifar10_ve": _cfg(
        "vesde", True, _DATA_01, **_SMALL, progressive="none", progressive_input="residual", sigma_max=50.0
    ),
    # ve/cifar10_ncsnpp: the same network, discrete: positional embedding, ÷ sigmas[label]
    "ncsnpp_cifar10_ve_discrete": _cfg(
        "vesde",
        False,
        _DATA_01,
        **_SMALL,
        progressive="none",
        progressive_input="residual",
        embedding_type="positional",
        sigma_max=50.0,
        num_scales=1000,
    ),
    # ve/*_256_ncsnpp_continuous: output_skip / input_skip (the google/ncsnpp-* architecture)
    "ncsnpp_highres_ve": _cfg("vesde", True, _DATA_01, **{**_SMALL, "ch_mult": [1, 1, 2]}, sigma_max=348.0),
    # vp/cifar10_ddpmpp_continuous: DDPM++ (no pyramids, no FIR), positional, centred, no ÷σ
    "ddpmpp_cifar10_vp": _cfg(
        "vpsde",
        True,
        _DATA_11,
        **_SMALL,
        progressive="none",
        progressive_input="none",
        fir=False,
        embedding_type="positional",
        scale_by_sigma=False,
    ),
    # vp/ddpm/cifar10: score_sde's DDPM (32 GroupNorm groups: widths of 32)
    "ddpm_cifar10_vp": _cfg(
        "vpsde",
        False,
        {"image_size": 8, "num_channels": 3, "centered": True},
        name="ddpm",
        nf=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[4],
        scale_by_sigma=False,
    ),
    # not released: residual input pyramid without FIR (strided convolutions, naive resampling in the
    # blocks), no skip rescaling, ELU
    "ncsnpp_residual_nofir_elu": _cfg(
        "vpsde",
        True,
        _DATA_11,
        **_SMALL,
        progressive="none",
        progressive_input="residual",
        fir=False,
        skip_rescale=False,
        nonlinearity="elu",
        embedding_type="positional",
        scale_by_sigma=False,
    ),
    # not released: input image pyramid concatenated (average-pool pyramid), leaky ReLU
    "ncsnpp_input_cat_lrelu": _cfg(
        "vpsde",
        True,
        _DATA_11,
        **_SMALL,
        progressive="none",
        progressive_input="input_skip",
        progressive_combine="cat",
        fir=False,
        nonlinearity="lrelu",
        embedding_type="positional",
        scale_by_sigma=False,
    ),
    # not released: DDPM blocks with FIR resampling and no resampling convolutions, ReLU, unconditional
    "ncsnpp_fir_no_conv": _cfg(
        "vesde",
        True,
        _DATA_01,
        **_SMALL,
        resblock_type="ddpm",
        resamp_with_conv=False,
        nonlinearity="relu",
        conditional=False,
        sigma_max=50.0,
    ),
}

#: Time labels fed to each net: σ (Fourier), label 999·s or a DDPM index (positional), a σ-table index.
LABELS: dict[str, list[float]] = {
    "ncsnpp_cifar10_ve": [0.02, 7.5],
    "ncsnpp_cifar10_ve_discrete": [0, 731],
    "ncsnpp_highres_ve": [0.05, 120.0],
    "ddpmpp_cifar10_vp": [3.2, 640.5],
    "ddpm_cifar10_vp": [12.0, 801.0],
    "ncsnpp_residual_nofir_elu": [1.5, 998.0],
    "ncsnpp_input_cat_lrelu": [250.0, 0.5],
    "ncsnpp_fir_no_conv": [0.3, 30.0],
}


def seeded_weights(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float64 weights for every parameter of ``net`` (state-dict order; ``sigmas`` kept):
    norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1), Fourier W 4 N(0, 1), others N(0, 1/fan_in) — so every
    block, including those score_sde initialises at zero, moves the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in net.state_dict().items():
        if name == "sigmas":
            out[name] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=g, dtype=torch.float64)
        if value.ndim == 1 and name.endswith(".W"):
            out[name] = 4 * noise
        elif value.ndim == 1 and name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        elif value.ndim == 1:
            out[name] = 0.1 * noise
        else:
            fan_in = value.shape[0] if name.endswith(".W") else value[0].numel()
            out[name] = noise / math.sqrt(fan_in)
    return out


def build(name: str, dtype=torch.float64) -> torch.nn.Module:
    cfg = sde_config.config_from_dict(NETS[name])
    net = sde_network.build(cfg, cfg.num_scales or 1000)
    net.load_state_dict(seeded_weights(net))
    return net.to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    return load_file(FIXTURE), meta


def test_fixture_covers_every_net(reference):
    tensors, meta = reference
    assert json.loads(meta["nets"]) == NETS and json.loads(meta["labels"]) == LABELS
    assert {k.split("/")[0] for k in tensors} == set(NETS)


@pytest.mark.parametrize("name", list(NETS))
def test_network_matches_score_sde(reference, name):
    tensors, meta = reference
    net = build(name)
    # the state dict score_sde's class has: same names, same order (its EMA list is positional)
    assert list(net.state_dict()) == json.loads(meta[f"{name}/keys"])
    x, labels, want = tensors[f"{name}/x"], tensors[f"{name}/labels"], tensors[f"{name}/out"]
    with torch.no_grad():
        got = net(x, labels.long() if name.endswith("discrete") else labels)
    # float64 in both; the sinusoidal embedding is float32 in both (as trained). Only the order of
    # floating-point operations differs (einsum vs bmm attention, depthwise vs per-channel FIR): ~1e-15
    assert rel(got, want) < 1e-12, rel(got, want)


def test_float32_matches_float64(reference):
    tensors, _ = reference
    name = "ncsnpp_cifar10_ve"
    net = build(name, torch.float32)
    with torch.no_grad():
        got = net(tensors[f"{name}/x"].float(), tensors[f"{name}/labels"].float()).double()
    assert rel(got, tensors[f"{name}/out"]) < 1e-5  # float32 rounding through ~20 layers


def test_fir_resampling_known_values():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 2] = 1.0
    up = fir.upsample_2d(x)
    # upsampling spreads a unit pixel over the 4×4 footprint of 4·(k⊗k)/64, k = (1, 3, 3, 1): total 4
    assert up.shape == (1, 1, 8, 8) and float(up.sum()) == pytest.approx(4.0, rel=1e-15)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.equal(up[0, 0, 1:5, 3:7], torch.outer(k, k) / 16)
    const = torch.full((1, 2, 8, 8), 0.7, dtype=torch.float64)
    # interior pixels of a constant image keep their value (the borders see the zero padding)
    assert torch.allclose(fir.downsample_2d(const)[..., 1:-1, 1:-1], const[..., :2, :2].new_full((1, 2, 2, 2), 0.7))
    assert torch.allclose(fir.upsample_2d(const)[..., 2:-2, 2:-2], const.new_full((1, 2, 12, 12), 0.7))


def test_highres_ncsnpp_matches_its_diffusers_conversion():
    # widths of 32: diffusers' attention up-blocks build their resnet norms with 32 groups
    config = _cfg(
        "vesde", True, _DATA_01, nf=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], sigma_max=348.0
    )
    cfg = sde_config.config_from_dict(config)
    net = sde_network.build(cfg, 2000)
    net.load_state_dict(seeded_weights(net, seed=5))
    net = net.double().eval()
    unet = sde_convert.to_unet2d(cfg, net.state_dict()).double()
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.01, 0.8, 60.0], dtype=torch.float64)
    x = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64)
    x = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = net(x, sigma), unet(x, sigma).sample
    # same float64 weights; the attention kernels and the order of sums differ: ~1e-16
    assert rel(ours, theirs) < 1e-12, rel(ours, theirs)
    # the converter keeps refusing what UNet2DModel cannot express
    with pytest.raises(ModelLoadError, match="progressive='none' has no diffusers UNet2DModel equivalent"):
        sde_convert.to_unet2d(sde_config.read_config("ve/cifar10_ncsnpp_continuous")[0], {})
    with pytest.raises(ModelLoadError, match="vpsde model"):
        sde_convert.to_unet2d(sde_config.config_from_dict({**config, "training": {"sde": "vpsde"}}), {})


def test_unsupported_settings_are_named():
    # score_sde's upsampling layer (layerspp.Upsample) fails in PyTorch without FIR and as a FIR
    # up-convolution: networks that need it cannot have been trained with score_sde's code
    for progressive, fir_, resblock, conv in (
        ("residual", True, "biggan", True),
        ("output_skip", False, "biggan", True),
        ("none", True, "ddpm", True),
        ("none", False, "ddpm", False),
    ):
        with pytest.raises(ValueError, match="upsampling layer score_sde's code cannot run"):
            NCSNpp(
                image_size=16,
                nf=8,
                ch_mult=(1, 2),
                num_res_blocks=1,
                progressive=progressive,
                fir=fir_,
                resblock_type=resblock,
                resamp_with_conv=conv,
            )
    with pytest.raises(ValueError, match="progressive_input='pyramid'"):
        NCSNpp(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=1, progressive_input="pyramid")


@pytest.mark.parametrize("preset", ["ve/celebahq_256_ncsnpp_continuous", "ve/ffhq_1024_ncsnpp_continuous"])
def test_diffusers_key_map_covers_the_released_highres_networks(preset):
    cfg, _ = sde_config.read_config(preset)
    with torch.device("meta"):
        ours = sde_network.build(cfg, 2000)
        unet = sde_convert.build_unet(cfg)
    pairs = sde_convert.key_map(cfg, unet.state_dict().keys())
    # every parameter of both, in our (= score_sde's) parameter order
    assert [p.original for p in pairs] == [k for k in ours.state_dict() if k != "sigmas"]
    assert len(pairs) == len(unet.state_dict())
