"""Malformed inputs to every loader end in a one-line :class:`ConservcheckError`, never another exception.

Seeded random mutations of what users hand to conservcheck: diffusers scheduler and UNet configs, the
bytes of a safetensors weights file, score_sde configs and checkpoints, ``--data`` arrays (.npy, .npz,
.pt) and image folders. Each case either loads (a mutation can be harmless) or raises a
ConservcheckError whose message is one line with a hint; any other exception fails the test with the
case that caused it. The seeds are fixed, so a failure reproduces.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct

import numpy as np
import pytest
import torch

from conservcheck import VectorFieldProbe
from conservcheck.adapters import _diffusers, score_sde
from conservcheck.adapters.resolve import load_reference
from conservcheck.adapters.score_sde import config as sde_config
from conservcheck.adapters.score_sde import network as sde_network
from conservcheck.errors import ConservcheckError
from conservcheck.x0.data import load_data

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 20250611
#: Values that break type and range assumptions (sizes stay small, so nothing large is allocated).
WEIRD = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    1.5,
    -0.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "linear",
    "epsilon",
    [],
    [0],
    [1, 2],
    [-1.0, 2.0],
    {},
    {"a": 1},
    100_000,
]
#: A tiny NCSN++ (the layout of score_sde's configs) that builds in a fraction of a second.
TINY_SDE = {
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


def clean(case: str, call) -> ConservcheckError | None:
    """Run ``call``; None when it succeeds, the error when it raises a proper one-line ConservcheckError."""
    try:
        call()
    except ConservcheckError as err:
        assert "\n" not in str(err) and err.hint, f"{case}: {err!r}"
        return err
    except Exception as err:  # noqa: BLE001 - any other type is the failure this test looks for
        pytest.fail(f"{case}: {type(err).__name__}: {err}")
    return None


def mutate(rng: random.Random, data: dict, keys: list[str] | None = None, n: int = 3, pool: list = WEIRD) -> dict:
    """``data`` with up to ``n`` keys replaced by values from ``pool`` or deleted."""
    out = json.loads(json.dumps(data))
    for key in rng.sample(keys or sorted(out), min(n, len(keys or out))):
        if rng.random() < 0.2:
            out.pop(key, None)
        else:
            out[key] = rng.choice(pool)
    return out


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


# ---------------------------------------------------------------------------------------------------
# diffusers folders


def test_scheduler_configs(ddpm_folder):
    rng = random.Random(SEED)
    base = json.loads((ddpm_folder() / "scheduler" / "scheduler_config.json").read_text())
    names = [*_diffusers.SUPPORTED_SCHEDULERS, "EulerDiscreteScheduler", "FooScheduler", None, 3]
    errors = 0
    for i in range(80):
        cfg = mutate(rng, base, n=rng.randint(1, 4))
        if rng.random() < 0.3:
            cfg["_class_name"] = rng.choice(names)
        errors += clean(f"scheduler config {i}: {cfg}", lambda: _diffusers.scheduler_units(cfg, "fuzz")) is not None
    assert 10 < errors < 80  # the mutations hit both harmless and fatal values


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_folder_configs(ddpm_folder, tmp_path):
    rng = random.Random(SEED + 1)
    src = ddpm_folder()
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    unet_keys = [
        "sample_size",
        "in_channels",
        "out_channels",
        "layers_per_block",
        "block_out_channels",
        "norm_num_groups",
        "down_block_types",
        "up_block_types",
        "_class_name",
        "num_class_embeds",
        "time_embedding_type",
    ]
    for i in range(10):
        folder = _copy(src, tmp_path / f"m{i}")
        target = rng.choice(["unet", "unet", "scheduler", "index"])
        if target == "unet":
            # no large values: a UNet with 10⁵ layers per block is a valid, enormous model
            text = json.dumps(mutate(rng, unet_cfg, unet_keys, n=1, pool=WEIRD[:-1]))
            (folder / "unet" / "config.json").write_text(text)
        elif target == "scheduler":
            text = rng.choice(["", "{", "[]", "null", '{"_class_name": "DDPMScheduler", "beta_schedule": 5}'])
            (folder / "scheduler" / "scheduler_config.json").write_text(text)
        else:
            text = rng.choice(["", "{", "[]", '{"unet": 3}'])
            (folder / "model_index.json").write_text(text)
        clean(f"folder {i}: {target} ← {text[:300]}", lambda: load_reference(str(folder)))


def _truncations(rng: random.Random, blob: bytes) -> list[tuple[str, bytes]]:
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + n]
    cut = rng.randrange(len(blob))
    flip = bytearray(blob)
    at = rng.randrange(8 + n)  # a byte of the length or the JSON header
    flip[at] ^= 1 << rng.randrange(8)
    fake = json.dumps(
        {
            "w": {
                "dtype": rng.choice(["F32", "Q9", 3]),
                "shape": rng.choice([[2], [-1], "x", [2, 2]]),
                "data_offsets": rng.choice([[0, 8], [8, 0], [0], "x", [0, 10**12]]),
            }
        }
    ).encode()
    return [
        (f"cut at {cut}", blob[:cut]),
        (f"bit flip at {at}", bytes(flip)),
        ("header only", blob[: 8 + n]),
        ("random header", struct.pack("<Q", len(fake)) + fake + random_bytes(rng, 16)),
        ("random bytes", random_bytes(rng, rng.randrange(64))),
        ("header length too large", struct.pack("<Q", 2**63) + header),
    ]


def test_safetensors_bytes(ddpm_folder, tmp_path):
    rng = random.Random(SEED + 2)
    src = ddpm_folder()
    blob = (src / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for i, (what, data) in enumerate(_truncations(rng, blob)):
        folder = _copy(src, tmp_path / f"m{i}")
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data)
        err = clean(f"safetensors {what}", lambda: load_reference(str(folder)))
        if not what.startswith("bit flip"):  # every other mutation changes the length
            assert err is not None and "is damaged" in err.message, what


# ---------------------------------------------------------------------------------------------------
# score_sde


def test_score_sde_configs():
    rng = random.Random(SEED + 3)
    sections = {
        "training": ["sde", "continuous"],
        "data": ["image_size", "num_channels", "centered"],
        "model": [
            "nf",
            "ch_mult",
            "num_res_blocks",
            "attn_resolutions",
            "sigma_max",
            "sigma_min",
            "embedding_type",
            "fir_kernel",
            "scale_by_sigma",
            "progressive",
            "beta_min",
            "beta_max",
        ],
    }
    errors = 0
    for i in range(150):
        cfg = json.loads(json.dumps(TINY_SDE))
        for _ in range(rng.randint(1, 3)):
            section = rng.choice(sorted(sections))
            if rng.random() < 0.1:
                cfg[section] = rng.choice(WEIRD)
            elif isinstance(cfg.get(section), dict):
                cfg[section] = mutate(rng, cfg[section], sections[section], n=1)
        if rng.random() < 0.05:
            cfg = rng.choice(WEIRD)

        def build():
            c = sde_config.config_from_dict(cfg, "fuzz")
            with torch.device("meta"):  # the architecture, without memory for absurd widths
                sde_network.build(c, c.num_scales or 1000)
            score_sde.units(c, c.num_scales or 1000)

        errors += clean(f"score_sde config {i}: {cfg}", build) is not None
    assert 20 < errors < 150


def _checkpoint_objects(rng: random.Random) -> list[tuple[str, object]]:
    t = torch.zeros(rng.randint(0, 3), 2)
    return [
        ("bare list", [1, 2, 3]),
        ("model is a list", {"model": [t], "all_modules.0": 1}),
        ("wrong tensors", {"model": {"module.all_modules.0.W": t, "module.sigmas": torch.ones(3)}, "ema": None}),
        ("ema not a dict", {"model": {"all_modules.0.W": t}, "ema": {"shadow_params": [t, "x"]}}),
        ("ema short", {"model": {"all_modules.0.W": t}, "ema": {"shadow_params": []}, "step": "x"}),
        ("sigmas nan", {"model": {"module.sigmas": torch.tensor([float("nan"), 1.0]), "module.all_modules.0.W": t}}),
    ]


def test_score_sde_checkpoints(tmp_path):
    rng = random.Random(SEED + 4)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_SDE))
    cases: list[tuple[str, bytes]] = []
    for what, obj in _checkpoint_objects(rng):
        buf = io.BytesIO()
        torch.save(obj, buf)
        cases.append((what, buf.getvalue()))
    valid = cases[2][1]
    cases += [
        ("random bytes", b"all_modules." + random_bytes(rng, 200)),
        ("truncated zip", valid[: rng.randrange(30, len(valid))]),
        ("legacy pickle", pickle.dumps({"model": {"all_modules.0.W": [1.0]}})),
        ("empty", b""),
    ]
    for i, (what, data) in enumerate(cases):
        path = tmp_path / f"checkpoint_{i}.pth"
        path.write_bytes(data)
        clean(f"score_sde checkpoint {what}", lambda: score_sde.load(path, config=str(config)))
        clean(
            f"score_sde checkpoint {what} (trusted)",
            lambda: score_sde.load(path, config=str(config), trust_remote_code=True),
        )


# ---------------------------------------------------------------------------------------------------
# --data


IMAGE = VectorFieldProbe(lambda x, t: -x, sample_shape=(3, 8, 8))
FLAT = VectorFieldProbe(lambda x, t: -x, sample_shape=(2,), data_range=(-5.0, 5.0))
DTYPES = ["uint8", "uint8", "int8", "int64", "float16", "float32", "float64", "float64", "bool", "complex64", "<U3"]


def _array(rng: random.Random, probe: VectorFieldProbe) -> np.ndarray:
    """A random array: about half in a layout the probe accepts ([N, *shape], [N, H, W, C], [N, D])."""
    layouts = [probe.sample_shape, (probe.dim,)]
    if len(probe.sample_shape) == 3:
        layouts.append((*probe.sample_shape[1:], probe.sample_shape[0]))
    if rng.random() < 0.5:
        shape = (rng.randint(0, 6), *rng.choice(layouts))
    else:
        shape = tuple(rng.choice([0, 1, 2, 3, 8, 16]) for _ in range(rng.randint(0, 4)))
    values = np.random.default_rng(rng.randrange(2**32)).uniform(-1, 1, shape) * rng.choice([1, 1, 255, 1e6])
    if rng.random() < 0.2 and values.size:
        values.flat[0] = rng.choice([np.nan, np.inf])
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(values).astype(rng.choice(DTYPES))


def _write_array(rng: random.Random, path_stem, arr: np.ndarray) -> str:
    kind = rng.choice(["npy", "npy", "npz", "pt", "pt", "bytes"])
    if kind == "npy":
        path = path_stem.with_suffix(".npy")
        np.save(path, arr)
    elif kind == "npz":
        path = path_stem.with_suffix(".npz")
        np.savez(path, **{f"a{j}": arr for j in range(rng.randint(0, 2))})
    elif kind == "pt":
        path = path_stem.with_suffix(".pt")
        tensor = torch.from_numpy(arr) if arr.dtype.kind in "biufc" else [1, 2]
        torch.save(rng.choice([tensor, {"x": tensor}, {"x": tensor, "y": 1}, [tensor], {}]), path)
    else:
        path = path_stem.with_suffix(rng.choice([".npy", ".npz", ".pt"]))
        path.write_bytes(random_bytes(rng, rng.randrange(100)))
    if rng.random() < 0.15 and path.stat().st_size > 2:
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(1, len(data))])
    return str(path) + rng.choice(["", "", "#a0", "#x", "#nope"])


def test_data_arrays(tmp_path):
    rng = random.Random(SEED + 5)
    outcomes = {"ok": 0, "error": 0}
    for i in range(120):
        probe = rng.choice([IMAGE, FLAT])
        spec = _write_array(rng, tmp_path / f"d{i}", _array(rng, probe))
        n = rng.randint(1, 4)
        err = clean(f"--data {spec} for shape {probe.sample_shape}, n={n}", lambda: load_data(spec, probe, n, seed=i))
        outcomes["ok" if err is None else "error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def _image_bytes(rng: random.Random) -> bytes:
    from PIL import Image

    mode = rng.choice(["L", "RGB", "RGBA", "P", "1", "I;16", "F", "CMYK", "LA"])
    size = (rng.randint(1, 20), rng.randint(1, 20))
    img = Image.effect_noise(size, rng.choice([8, 64])).convert(mode)
    buf = io.BytesIO()
    fmt = rng.choice(["PNG", "TIFF", "BMP", "GIF", "WEBP"]) if mode in ("L", "RGB") else rng.choice(["PNG", "TIFF"])
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    choice = rng.random()
    if choice < 0.2:
        return data[: rng.randrange(1, len(data))]
    if choice < 0.3:
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 0xFF
        return bytes(flipped)
    if choice < 0.4:
        return random_bytes(rng, rng.randrange(64))
    return data


def test_image_folders(tmp_path):
    rng = random.Random(SEED + 6)
    outcomes = {"ok": 0, "error": 0}
    for i in range(25):
        folder = tmp_path / f"images{i}"
        (folder / "sub").mkdir(parents=True)
        for j in range(rng.randint(0, 4)):
            suffix = rng.choice([".png", ".jpg", ".tif", ".gif", ".webp", ".txt"])
            name = f"{'sub/' if rng.random() < 0.3 else ''}{j}{suffix}"
            (folder / name).write_bytes(_image_bytes(rng))
        probe = rng.choice([IMAGE, IMAGE, FLAT])
        n = rng.randint(1, 3)
        err = clean(
            f"image folder {i} for shape {probe.sample_shape}, n={n}", lambda: load_data(str(folder), probe, n, seed=i)
        )
        outcomes["ok" if err is None else "error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
