"""Class-conditional EDM networks: a pickled network with EDMPrecond's interface (``label_dim``,
``class_labels`` one-hot, ``force_fp32``) whose denoiser is exact for class-conditional Gaussian data.

Oracle: class y of data N(μ_y, σ_d² I) in EDM's VE coordinates x = y0 + σ n, so D*(x; σ, y) = μ_y +
σ_d²/(σ_d² + σ²)(x − μ_y); fed EDMPrecond's unconditional row of zeros it returns the posterior mean of
the class mixture, Σ_y r_y(x) D*(x; σ, y), r_y ∝ N(x; μ_y, (σ_d² + σ²) I). Both are exact denoisers, so
every guided field D_∅ + w (D_y − D_∅) is a score. EDM's own sampler (``edm_sampler`` in
NVlabs/edm's generate.py) steps with d = (x − D)/σ: the probe's −σ s must be that d.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from conservcheck import conditioning
from conservcheck.adapters import edm
from conservcheck.errors import UsageError

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
SHAPE = (2, 4, 4)
SIGMA_D = 0.8
CLASSES = 3


class EDMPrecond(torch.nn.Module):
    """EDMPrecond's interface (and class name, which the EDM adapter looks for in the pickle) around the
    exact class-conditional Gaussian denoiser."""

    def __init__(self) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = SHAPE[1], SHAPE[0], CLASSES
        self.sigma_data, self.sigma_min, self.sigma_max = 0.5, 0.002, 80.0
        g = torch.Generator().manual_seed(0)
        self.register_buffer("means", torch.randn(CLASSES, *SHAPE, generator=g))
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        labels = torch.zeros(1, CLASSES) if class_labels is None else class_labels.reshape(-1, CLASSES)
        labels = labels.to(x.dtype).expand(x.shape[0], CLASSES)
        s2 = sigma.to(x.dtype).reshape(-1, 1, 1, 1) ** 2
        mu = self.means.to(x.dtype)
        per_class = mu[None] + SIGMA_D**2 / (SIGMA_D**2 + s2[:, None]) * (x[:, None] - mu[None])  # [B, C, ...]
        logp = -((x[:, None] - mu[None]) ** 2).flatten(2).sum(2) / (2 * (SIGMA_D**2 + s2.reshape(-1, 1)))
        posterior = torch.softmax(logp, dim=1)
        unconditional = labels.sum(1) == 0
        weights = torch.where(unconditional[:, None], posterior, labels)
        return (weights.reshape(*weights.shape, 1, 1, 1) * per_class).sum(1) * self.weight


@pytest.fixture(scope="module")
def pickle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm-cond") / "network-snapshot-000100.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": EDMPrecond()}, f)
    return path


def test_probe_is_the_edm_euler_direction_and_guides_the_denoiser(pickle_path):
    probe = edm.load(pickle_path, trust_remote_code=True, dtype=F64, class_label=[2, 0])
    assert probe.conditioning.kind == "class" and probe.describe()["conditioning"]["null_class"] == "zeros"
    net = EDMPrecond().double()  # the pickled network's twin (its means come from a seeded draw)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64) * 1.5
    sigma = torch.tensor([0.05, 0.7, 4.0], dtype=F64)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0] * 3), CLASSES)
    with torch.no_grad():
        d_cond = (x - net(x, sigma, one_hot)) / sigma.reshape(-1, 1, 1, 1)
        d_null = (x - net(x, sigma)) / sigma.reshape(-1, 1, 1, 1)
        for w in (1.0, 7.5):
            with conditioning.select(probe, condition=1, guidance=w):
                ours = -sigma.reshape(-1, 1, 1, 1) * probe.score(x, sigma)
            want = d_null + w * (d_cond - d_null)
            # float64; (D − x)/σ² then × σ: ≤ 1e-13 relative
            assert torch.allclose(ours, want, rtol=1e-11, atol=1e-11 * float(want.abs().max())), w


def test_unconditional_network_refuses_a_label(tmp_path):
    import test_adapter_edm

    path = tmp_path / "network-snapshot-000001.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": test_adapter_edm.EDMPrecond()}, f)
    with pytest.raises(UsageError, match="unconditional network: it takes no --class-label"):
        edm.load(path, trust_remote_code=True, class_label=[1])


def test_cli_audit_with_labels_at_two_guidance_scales(pickle_path, audit_end_to_end):
    data = audit_end_to_end(
        pickle_path, "--trust-remote-code", "--class-label", "random", "--guidance-scale", "1,7.5", "--sigmas", "0.5,2"
    )
    assert data["model"]["adapter"] == "edm" and data["model"]["conditioning"]["class_labels"] == "random"
    assert {c["guidance"] for c in data["verdict"]["checks"]} == {1.0, 7.5}
    # exact conditional denoisers: every guided field is a score
    assert data["verdict"]["status"] == "pass", data["verdict"]["reason"]
