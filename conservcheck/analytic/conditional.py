"""A class-conditional field with exact answers: Gaussian mixtures per class, and their guided combination.

Data: class y ∈ {0, …, C − 1} with prior π_y, and x0 | y a Gaussian mixture with M diagonal components
(means μ_ym, standard deviations c_ym, weights ω_ym). Under a process the time-t marginals are mixtures
too (:class:`~conservcheck.analytic.fields.GaussianMixture`), so both scores are exact:

* s(x, t; y) = ∇ₓ log p_t(x | y) — the mixture of class y;
* s(x, t; ∅) = ∇ₓ log p_t(x) — the mixture of every class, weighted by π_y ω_ym (the null class C).

Both are gradients, hence so is the guided field s_∅ + w (s_y − s_∅) for every w: the conservative
control of a conditional audit. With ``curl = λ`` the conditional field gains a rotation λ K x (K a fixed
antisymmetric matrix with unit entries above the diagonal, −1 below): s(x, t; y) + λ K x is not a
gradient, and the guided field's non-conservative part is w λ K x — it grows linearly with w, while the
unconditional field (w = 0) stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from conservcheck.analytic.fields import GaussianMixture
from conservcheck.conditioning import ConditionalField, class_conditioning
from conservcheck.errors import UsageError
from conservcheck.probe import ProbeInfo, VectorFieldProbe
from conservcheck.process import OUProcess, Process


class ConditionalGaussianMixture(torch.nn.Module):
    """``network(x, t, class_labels)``: the exact score of class y (label C: of the whole mixture).

    Args:
        means: [C, M, D] component means per class.
        stds: scalar, [C, M] or [C, M, D] component standard deviations.
        priors: [C] class probabilities (uniform by default); ``weights``: [C, M] within-class weights.
        process: the noising process (OU by default); ``sample_shape``: shape of one sample, (D,) by default.
        curl: λ of the rotation λ K x added to every conditional (not the null-class) score.
    """

    rotation: Tensor

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        priors: Tensor | None = None,
        weights: Tensor | None = None,
        process: Process | None = None,
        sample_shape: tuple[int, ...] | None = None,
        curl: float = 0.0,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 3:
            raise UsageError("means must have shape [C, M, D]", "stack M component means per class")
        c, m, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim <= 2 and stds.numel() in (1, c * m):
            stds = stds.expand(c * m).reshape(c, m, 1).expand(c, m, d)
        if stds.shape != (c, m, d):
            raise UsageError("stds must be a scalar, [C, M] or [C, M, D]", "check the component widths")
        pri = torch.full((c,), 1.0 / c, dtype=torch.float64) if priors is None else torch.as_tensor(priors).double()
        wts = torch.full((c, m), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if pri.shape != (c,) or wts.shape != (c, m) or bool((pri <= 0).any()) or bool((wts <= 0).any()):
            raise UsageError("priors must be [C] and weights [C, M], all positive", "check the class priors")
        wts = wts / wts.sum(1, keepdim=True)
        self.mixture = GaussianMixture(
            means.reshape(c * m, d),
            stds.reshape(c * m, d),
            ((pri / pri.sum())[:, None] * wts).reshape(c * m),
            process=process if process is not None else OUProcess(),
            sample_shape=sample_shape,
        )
        self.n_classes, self.per_class = c, m
        self.curl = float(curl)
        k = torch.triu(torch.ones(d, d, dtype=torch.float64), 1)
        self.register_buffer("rotation", k - k.T)

    @property
    def process(self) -> Process:
        return self.mixture.process

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.mixture.sample_shape)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        logj, diff, var = self.mixture._components(x, t)
        own = torch.arange(self.n_classes * self.per_class, device=x.device) // self.per_class
        labels = class_labels.to(x.device).reshape(-1, 1)
        keep = (own[None, :] == labels) | (labels == self.n_classes)
        r = torch.softmax(logj.masked_fill(~keep, -torch.inf), dim=1)
        score = -(r[:, :, None] * diff / var).sum(1)
        if self.curl:
            rot = x.reshape(x.shape[0], -1) @ self.rotation.to(x).T
            score = score + self.curl * (labels != self.n_classes).to(x.dtype) * rot
        return score.reshape(x.shape)

    def sample(self, labels: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Clean samples x0 | y for each label in ``labels``, [len(labels), *shape], float64."""
        out = []
        for y in labels:
            comp = (
                int(
                    torch.multinomial(
                        self.mixture.log_weights.exp()[y * self.per_class : (y + 1) * self.per_class],
                        1,
                        generator=generator,
                    )
                )
                + y * self.per_class
            )
            z = torch.randn(self.mixture.dim, generator=generator, dtype=torch.float64)
            out.append(self.mixture.means[comp] + self.mixture.stds[comp] * z)
        return torch.stack(out).reshape(len(out), *self.sample_shape)


def conditional_probe(
    mixture: ConditionalGaussianMixture,
    class_label: int | Sequence[int] | str | None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    name: str = "conditional-gaussian-mixture",
) -> VectorFieldProbe:
    """The mixture as a conditional probe in score units, with the given class label(s) or ``"random"``;
    its unconditional input is the null class C (the whole mixture)."""
    conditioning, labels = class_conditioning(
        class_label, mixture.n_classes, mixture.n_classes, "the marginal mixture (null class)"
    )
    field = ConditionalField(
        mixture,
        {"class_labels": labels},
        {"class_labels": torch.tensor([mixture.n_classes])},
        conditioning,
    )
    return VectorFieldProbe(
        field.to(device),
        process=mixture.process,
        sample_shape=mixture.sample_shape,
        parameterization="score",
        device=device,
        dtype=dtype,
        info=ProbeInfo(name=name, adapter="analytic", extra={"curl": mixture.curl}),
    )


__all__ = ["ConditionalGaussianMixture", "conditional_probe"]
