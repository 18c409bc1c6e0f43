"""A small MLP ε-predictor for data in ℝ^D noised by the paper's OU process, fed canonical OU time.

The network predicts the noise ε of y = α x0 + σ ε (α = e^{−t}, σ = √(1 − e^{−2t}), Eq. 1), so the score
is s = −ε̂/σ. Inside, it works in variance-exploding coordinates ỹ = y/α, σ̃ = σ/α (so ỹ = x0 + σ̃ ε) with
EDM's preconditioning (Karras et al. 2022) taken per coordinate with data scales σ_d,i:

    D(ỹ) = c_skip ỹ + c_out F(c_in ỹ, c_noise),   c_in = 1/√(σ̃² + σ_d²),  c_skip = σ_d²/(σ̃² + σ_d²),
    c_out = σ̃ σ_d/√(σ̃² + σ_d²),                 c_noise = ¼ log σ̃,

and returns ε̂ = (ỹ − D)/σ̃ = (y − α D)/σ = σ̃ ỹ/(σ̃² + σ_d²) − σ_d F/√(σ̃² + σ_d²). EDM's loss
λ‖D − x0‖² with λ = 1/c_out² is, in these terms, Σ_i (1 + σ̃²/σ_d,i²)(ε̂_i − ε_i)²: the regression target
of F has unit scale at every noise level. F is an MLP with residual blocks; c_noise enters through sine /
cosine features and a small MLP added to every block. Pure torch: no model library is imported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from conservcheck.errors import UsageError


@dataclass
class FunnelNetConfig:
    """Architecture of :class:`FunnelNet`; ``sigma_data`` has one scale per coordinate (length ``dim``)."""

    dim: int = 10
    hidden: int = 256
    blocks: int = 3
    embed: int = 64
    sigma_data: list[float] = field(default_factory=lambda: [3.0] + [math.exp(9.0 / 4.0)] * 9)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunnelNetConfig:
        return cls(**{k: data[k] for k in ("dim", "hidden", "blocks", "embed", "sigma_data") if k in data})


class _Block(nn.Module):
    """Pre-norm residual block: h + W₂ SiLU(W₁ SiLU(LN(h)) + time embedding)."""

    def __init__(self, hidden: int, embed: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.inner = nn.Linear(hidden, hidden)
        self.time = nn.Linear(embed, hidden)
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.inner(nn.functional.silu(self.norm(h))) + self.time(emb)
        update: Tensor = self.outer(nn.functional.silu(z))
        return h + update


class FunnelNet(nn.Module):
    """ε̂(y, t) for y [B, dim] and canonical OU time t [B] (or 0-d), output [B, dim]."""

    sigma_data: Tensor
    freqs: Tensor

    def __init__(self, config: FunnelNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FunnelNetConfig()
        c = self.config
        if len(c.sigma_data) != c.dim:
            raise UsageError(
                f"sigma_data has {len(c.sigma_data)} entries, dim is {c.dim}", "give one data scale per coordinate"
            )
        self.register_buffer("sigma_data", torch.tensor(c.sigma_data, dtype=torch.float32), persistent=False)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), c.embed // 2)), persistent=False)
        self.embed = nn.Sequential(nn.Linear(c.embed, c.embed), nn.SiLU(), nn.Linear(c.embed, c.embed))
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(_Block(c.hidden, c.embed) for _ in range(c.blocks))
        self.norm = nn.LayerNorm(c.hidden)
        self.out = nn.Linear(c.hidden, c.dim)

    def forward(self, y: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        t = t.expand(y.shape[0]) if t.ndim == 0 else t
        alpha = torch.exp(-t)[:, None]
        s = (torch.sqrt(-torch.expm1(-2 * t)) / torch.exp(-t))[:, None]
        y_ve, sd = y / alpha, self.sigma_data.to(y.dtype)
        var = s**2 + sd**2
        phase = 0.25 * torch.log(s) * self.freqs.to(y.dtype)
        emb = self.embed(torch.cat([torch.sin(phase), torch.cos(phase)], dim=1))
        h = self.inp(y_ve * torch.rsqrt(var))
        for block in self.blocks:
            h = block(h, emb)
        f: Tensor = self.out(nn.functional.silu(self.norm(h)))
        # (ỹ − c_skip ỹ − c_out F)/σ̃ written without the cancellation of ỹ − c_skip ỹ at small σ̃
        return s * y_ve / var - sd * torch.rsqrt(var) * f


__all__ = ["FunnelNet", "FunnelNetConfig"]
