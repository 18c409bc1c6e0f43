"""Conditional fields: one score per condition, and the classifier-free-guided field samplers follow.

A conditional network ε_θ(x, t, c) — a text-to-image UNet fed a prompt's embedding, a DiT fed a class
label — is one vector field per condition c: s(x, t; c) ≈ ∇ₓ log p_t(x | c). Each of them is a score
(of p_t(· | c)) if the network has learned one, and the paper's question is asked per condition. Samplers
with classifier-free guidance (Ho & Salimans 2022) follow another field,

    s_w(x, t; c) = s(x, t; ∅) + w (s(x, t; c) − s(x, t; ∅)),                         (guided field)

with ∅ the network's unconditional input (the empty prompt, or the negative prompt; the null class).
w = 1 is the conditional field, w = 0 the unconditional one. If s(·; c) and s(·; ∅) are both scores,
s_w is the gradient of log p_t(x | ∅) + w (log p_t(x | c) − log p_t(x | ∅)): it is conservative for
every w, and its loop integrals and curl vanish. A non-conservative part r of the pair is multiplied:
the guided field's curl is (1 − w) curl s_∅ + w curl s_c, growing linearly with w.

Every parameterization is affine in the network output with one x term, s = a(t) x + b(t) out (ε, x̂0,
v, velocity; :mod:`conservcheck.parameterization`), so guiding the output, as pipelines do
(ε_∅ + w (ε_c − ε_∅)), is guiding the score: the x terms carry weight (1 − w) + w = 1.

* :class:`Conditioning` describes the conditions of a probe (prompts or class labels) for reports, and
  assigns them to samples: ``cycle`` (sample i gets condition i mod K) or ``random`` (a seeded draw per
  sample from the stream (seed, "condition", i), so a sample's condition never depends on batching).
* :class:`ConditionalField` is ``fn(x, native_time)`` of a conditional network at one *selected*
  condition and guidance scale w: it feeds the network its condition inputs expanded over the batch,
  and for w ∉ {0, 1} runs the unconditional and conditional inputs as one doubled batch, as pipelines do.
  A probe whose ``fn`` is a ConditionalField is conditional (:attr:`VectorFieldProbe.conditioning`).
* :func:`select` chooses the condition and w for the duration of a ``with`` block; :func:`groups`
  splits sample indices by their condition, so a diagnostic runs once per condition on its samples
  with their global indices (the same loops and probe vectors whatever the grouping).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from conservcheck import rng
from conservcheck.errors import UsageError

ASSIGNMENTS = ("cycle", "random")
#: The random stream of a sample's condition under the ``random`` assignment.
CONDITION_STREAM = "condition"


def sha256_text(text: str) -> str:
    """SHA-256 of a prompt's UTF-8 bytes (how reports name a prompt whose text they leave out)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Conditioning:
    """What a conditional probe is conditioned on, and which sample gets which condition.

    Attributes:
        kind: ``text`` (prompts) or ``class`` (class labels).
        n_conditions: K, the number of conditions the field can select (prompts given, or classes).
        assignment: ``cycle`` (sample i → condition i mod K) or ``random`` (sample i → a uniform draw
            from the stream (seed, "condition", i)).
        description: the JSON-ready record reports keep under ``model.conditioning`` (prompts and their
            SHA-256, negative prompt, class labels, the unconditional input).
    """

    kind: str
    n_conditions: int
    assignment: str = "cycle"
    description: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.assignment not in ASSIGNMENTS:
            raise UsageError(
                f"unknown condition assignment {self.assignment!r}", f"use one of {', '.join(ASSIGNMENTS)}"
            )
        if self.n_conditions < 1:
            raise UsageError("a conditional field needs at least one condition", "give a prompt or a class label")

    def assign(self, index: Sequence[int], seed: int) -> list[int]:
        """The condition of each global sample index (see ``assignment``)."""
        if self.assignment == "cycle":
            return [int(i) % self.n_conditions for i in index]
        return [
            int(torch.randint(self.n_conditions, (), generator=rng.generator(seed, CONDITION_STREAM, int(i))))
            for i in index
        ]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "assignment": self.assignment, **dict(self.description)}


def text_conditioning(prompts: Sequence[str], negative_prompt: str | None = None) -> Conditioning:
    """K prompts, cycled over samples; the unconditional input is the negative prompt or the empty prompt."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UsageError(
            "a text-to-image model needs a prompt", "pass --prompt TEXT (--prompt '' for the empty prompt)"
        )
    return Conditioning(
        "text",
        len(prompts),
        "cycle",
        {
            "prompts": prompts,
            "prompt_sha256": [sha256_text(p) for p in prompts],
            "negative_prompt": negative_prompt,
            "negative_prompt_sha256": sha256_text(negative_prompt) if negative_prompt is not None else None,
            "unconditional": "the negative prompt" if negative_prompt is not None else "the empty prompt",
        },
    )


def class_conditioning(
    labels: int | Sequence[int] | str | None, num_classes: int, null: int | str | None, unconditional: str
) -> tuple[Conditioning, Tensor]:
    """The conditioning of class labels and the label of each condition ([K] int64).

    ``labels``: one label, a list (cycled over samples), or ``"random"`` (every class a condition, one
    seeded draw per sample). ``null`` names the unconditional input in reports (e.g. DiT's null class
    1000), ``unconditional`` says what it is.
    """
    if labels is None:
        raise UsageError(
            "a class-conditional model needs a class label", f"pass --class-label N (0 ≤ N < {num_classes}) or random"
        )
    shown: str | list[int]
    if isinstance(labels, str):
        if labels.strip().lower() != "random":
            raise UsageError(f"class label {labels!r} is not a number or random", "pass --class-label N or random")
        ids = list(range(num_classes))
        assignment, shown = "random", "random"
    else:
        ids = [int(labels)] if isinstance(labels, int) else [int(v) for v in labels]
        bad = [v for v in ids if not 0 <= v < num_classes]
        if bad or not ids:
            raise UsageError(
                f"class label {bad[0] if bad else labels!r} is outside the model's {num_classes} classes",
                f"pick labels in 0 … {num_classes - 1}",
            )
        assignment, shown = "cycle", ids
    description = {
        "class_labels": shown,
        "num_classes": int(num_classes),
        "null_class": null,
        "unconditional": unconditional,
    }
    return Conditioning("class", len(ids), assignment, description), torch.tensor(ids, dtype=torch.long)


Network = Callable[..., Tensor]


class ConditionalField(torch.nn.Module):
    """``fn(x, native_time)`` of a conditional network at the selected condition and guidance scale.

    Args:
        network: ``network(x, native_time, **inputs) -> output`` of shape [B, *sample_shape] in the
            model's output units (ε, x̂0, v, velocity or score), ``inputs`` being the condition tensors
            of B rows (e.g. ``encoder_hidden_states`` [B, L, d], ``class_labels`` [B]).
        conditions: the condition inputs of all K conditions: name → tensor [K, ...].
        null: the unconditional inputs: name → tensor [1, ...] (same names).
        conditioning: the description and assignment of the K conditions.

    ``condition`` (index into the K) and ``guidance`` (w) select the field; change them with
    :func:`select`. The inputs are buffers, so ``.to(device, dtype)`` moves them with the network.
    """

    def __init__(
        self,
        network: Network,
        conditions: Mapping[str, Tensor],
        null: Mapping[str, Tensor],
        conditioning: Conditioning,
    ) -> None:
        super().__init__()
        if set(conditions) != set(null):
            raise UsageError(
                f"conditional inputs {sorted(conditions)} and unconditional inputs {sorted(null)} differ",
                "give the same input names for both",
            )
        sizes = {int(v.shape[0]) for v in conditions.values()}
        if sizes != {conditioning.n_conditions} or any(int(v.shape[0]) != 1 for v in null.values()):
            raise UsageError(
                f"condition inputs hold {sorted(sizes)} rows for {conditioning.n_conditions} conditions "
                "(and the unconditional inputs must hold one row)",
                "stack one row per condition",
            )
        self.network = network
        self.names = tuple(conditions)
        for name in self.names:
            self.register_buffer(f"cond_{name}", conditions[name])
            self.register_buffer(f"null_{name}", null[name])
        self.conditioning = conditioning
        self.condition = 0
        self.guidance = 1.0
        self.eval()

    def inputs(self, which: str, batch: int) -> dict[str, Tensor]:
        """The ``cond`` (selected condition) or ``null`` inputs, expanded to ``batch`` rows."""
        out = {}
        for name in self.names:
            v = getattr(self, f"{which}_{name}")
            row = v[self.condition : self.condition + 1] if which == "cond" else v
            out[name] = row.expand(batch, *row.shape[1:])
        return out

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, w = x.shape[0], self.guidance
        if w == 1.0:
            return self.network(x, t, **self.inputs("cond", b))
        if w == 0.0:
            return self.network(x, t, **self.inputs("null", b))
        null, cond = self.inputs("null", b), self.inputs("cond", b)
        both = {k: torch.cat([null[k], cond[k]]) for k in self.names}
        out = self.network(torch.cat([x, x]), torch.cat([t, t]), **both)
        uncond, conditional = out[:b], out[b:]
        return uncond + w * (conditional - uncond)


def field_of(probe: Any) -> ConditionalField | None:
    """The probe's :class:`ConditionalField` (its ``fn``), or None for an unconditional probe."""
    fn = getattr(probe, "fn", probe)
    return fn if isinstance(fn, ConditionalField) else None


def check_guidance(w: float) -> float:
    w = float(w)
    if not (math.isfinite(w) and w >= 0):
        raise UsageError(f"guidance scale must be a finite number ≥ 0, got {w!r}", "use e.g. 1 (conditional) or 7.5")
    return w


@contextmanager
def select(probe: Any, condition: int | None = None, guidance: float | None = None) -> Iterator[None]:
    """Within the block, the probe's field is that of ``condition`` at guidance scale ``guidance``
    (None: left as it is); both are restored afterwards. Unconditional probes accept only None."""
    field_ = field_of(probe)
    if field_ is None:
        if condition is not None or guidance is not None:
            raise UsageError(
                "the model is unconditional: it has no condition or guidance scale to select",
                "drop --prompt, --class-label and --guidance-scale",
            )
        yield
        return
    old = (field_.condition, field_.guidance)
    if condition is not None:
        if not 0 <= int(condition) < field_.conditioning.n_conditions:
            raise UsageError(
                f"condition {condition} is out of range (the field has {field_.conditioning.n_conditions})",
                "pick a condition index in range",
            )
        field_.condition = int(condition)
    if guidance is not None:
        field_.guidance = check_guidance(guidance)
    try:
        yield
    finally:
        field_.condition, field_.guidance = old


def groups(probe: Any, index: Sequence[int], seed: int) -> list[tuple[int | None, list[int]]]:
    """Positions in ``index`` grouped by their samples' condition: [(condition, positions)], conditions
    in increasing order; one group (condition None) holding every position for an unconditional probe."""
    field_ = field_of(probe)
    if field_ is None:
        return [(None, list(range(len(index))))]
    out: dict[int, list[int]] = {}
    for pos, c in enumerate(field_.conditioning.assign(index, seed)):
        out.setdefault(c, []).append(pos)
    return sorted(out.items())


__all__ = [
    "ASSIGNMENTS",
    "CONDITION_STREAM",
    "ConditionalField",
    "Conditioning",
    "check_guidance",
    "class_conditioning",
    "field_of",
    "groups",
    "select",
    "sha256_text",
    "text_conditioning",
]
