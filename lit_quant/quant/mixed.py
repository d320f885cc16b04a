"""Mixed-precision maths: knobs, their costs, the sensitivity record and the greedy narrowing order.

**Knobs.** Every quantizer of a prepared model is governed by one plan name (a layer, an absorbed producer such
as ``layers.0.add``, or ``input``; :attr:`lit_quant.quant.FakeQuantize.plan_name`); a knob is a plan name and a
kind, the weights or the output activation of that name, and a plan override sets its width
(:func:`mixed_plan`).

**Sensitivity** of knob ``k`` at width ``b`` (:class:`Sensitivity`, measured by the application): only that
knob's quantizers fake-quantize, everything else computes in float, and one pass over validation images gives

    SQNR_k(b) = 10 log10( sum(z^2) / sum((z - z_k,b)^2) )  dB        (z: fp32 logits, z_k,b: the knob's)
    drop_k(b) = top1_val(fp32) - top1_val(knob k at b bits)          points

**Order** (:func:`step_order`): every knob starts at the widest width. Each step narrows one knob to its next
width; steps are taken cheapest first, the cost of a step being the logit noise it adds, estimated from the
sensitivity as ``10^(-SQNR/10)`` (noise powers of independent layers add), per unit of what it saves
(:func:`packed_weight_bytes`, or :func:`bit_operations`: MACs x weight bits x input bits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from lit_quant.quant.fake_quant import FakeQuantize, iter_quantizers
from lit_quant.quant.layers import QuantWeightLayer
from lit_quant.quant.plan import LayerOverride, QuantPlan

#: SQNR reported when a change moves no logit at all (a finite number JSON can hold).
MAX_SQNR_DB = 200.0


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(sum(reference^2) / sum((reference - test)^2))``, at most :data:`MAX_SQNR_DB`."""
    noise = float(((reference - test) ** 2).sum())
    signal = float((reference ** 2).sum())
    return MAX_SQNR_DB if noise == 0 else min(MAX_SQNR_DB, 10 * math.log10(signal / noise))


class Knob(NamedTuple):
    """One width to choose: the weights (``kind="weight"``) or the output (``"act"``) of a plan name."""

    name: str
    kind: str

    @property
    def key(self) -> str:
        """``name|kind``: the knob as a JSON key."""
        return f"{self.name}|{self.kind}"

    @classmethod
    def parse(cls, key: str) -> Knob:
        """The knob of a :attr:`key`."""
        name, _, kind = key.rpartition("|")
        return cls(name, kind)


@dataclass(frozen=True)
class KnobScore:
    """One knob quantized alone at one width: the logits' SQNR (dB) and the validation top-1 drop (points)."""

    sqnr_db: float
    drop: float


@dataclass
class Sensitivity:
    """Every knob's :class:`KnobScore` at each width, on ``images`` validation images; ``seconds`` and
    ``passes`` are what measuring it took (0 when every width came from a cache)."""

    fp32_val_top1: float
    images: int
    widths: dict[int, dict[Knob, KnobScore]] = field(default_factory=dict)
    seconds: float = 0.0
    passes: int = 0

    def noise_power(self, knob: Knob, bits: int) -> float:
        """Relative logit noise power of ``knob`` alone at ``bits``: ``10^(-SQNR/10)``."""
        return 10 ** (-self.widths[bits][knob].sqnr_db / 10)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``sensitivity.json``): widths and knobs as string keys, widest first."""
        return {"fp32_val_top1": self.fp32_val_top1, "images": self.images,
                "widths": {str(b): {"knobs": scores_to_dict(self.widths[b])}
                           for b in sorted(self.widths, reverse=True)},
                "seconds": self.seconds, "passes": self.passes}


def scores_to_dict(scores: dict[Knob, KnobScore]) -> dict[str, dict[str, float]]:
    """One width's scores as JSON: ``{"name|kind": {"sqnr_db": ..., "drop": ...}}``."""
    return {knob.key: dataclasses.asdict(score) for knob, score in scores.items()}


def scores_from_dict(data: dict[str, dict[str, float]]) -> dict[Knob, KnobScore]:
    """The inverse of :func:`scores_to_dict`."""
    return {Knob.parse(key): KnobScore(float(v["sqnr_db"]), float(v["drop"])) for key, v in data.items()}


def knob_quantizers(model: nn.Module) -> dict[Knob, list[FakeQuantize]]:
    """Every knob of a prepared model with its quantizers, in execution order."""
    knobs: dict[Knob, list[FakeQuantize]] = {}
    for _, fq in iter_quantizers(model):
        if fq.plan_name is not None:
            knobs.setdefault(Knob(fq.plan_name, fq.kind), []).append(fq)
    return knobs


@dataclass
class LayerCost:
    """What a quantized Conv/Linear costs: its weight count, its MACs per image and the knob of its input."""

    weights: int
    macs: int
    input_knob: Knob | None


def layer_costs(model: nn.Module, example: torch.Tensor) -> dict[str, LayerCost]:
    """Weight counts, MACs per image (one forward of ``example[:1]``: output elements x weights per output)
    and input knobs of every quantized Conv/Linear of a prepared model, by plan name."""
    costs: dict[str, LayerCost] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, QuantWeightLayer) and module.weight_quant is not None:
            fq = module.weight_quant
            source = module.input_quantizer()
            knob = Knob(source.plan_name, "act") if source is not None and source.plan_name is not None else None

            def hook(m: nn.Module, _args: Any, out: torch.Tensor, name: str = str(fq.plan_name),
                     knob: Knob | None = knob) -> None:
                per_output = m.weight[0].numel()  # in_channels / groups x kernel (Conv), in_features (Linear)
                costs[name] = LayerCost(m.weight.numel(), out[0].numel() * per_output, knob)

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return costs


def packed_weight_bytes(costs: dict[str, LayerCost], widths: dict[Knob, int]) -> int:
    """Bytes of the weights packed at their widths: ``sum ceil(n_weights x bits / 8)`` (float weights: 32 bits)."""
    return sum(math.ceil(c.weights * widths.get(Knob(name, "weight"), 32) / 8) for name, c in costs.items())


def bit_operations(costs: dict[str, LayerCost], widths: dict[Knob, int]) -> int:
    """Bit-operations per image: ``sum MACs x weight bits x input bits`` (a float input counts 32 bits)."""
    return sum(c.macs * widths.get(Knob(name, "weight"), 32) * (widths.get(c.input_knob, 32) if c.input_knob else 32)
               for name, c in costs.items())


def objective(costs: dict[str, LayerCost], widths: dict[Knob, int], name: str) -> int:
    """The search objective of an assignment: packed weight bytes or bit-operations."""
    return packed_weight_bytes(costs, widths) if name == "size" else bit_operations(costs, widths)


@dataclass
class Step:
    """Narrowing one knob from one width to the next, with the noise it adds per unit of objective saved."""

    knob: Knob
    bits: int
    saving: int
    noise: float

    @property
    def rate(self) -> float:
        return self.noise / self.saving


def step_order(sens: Sensitivity, knobs: Sequence[Knob], widths: Sequence[int], costs: dict[str, LayerCost],
               objective_name: str) -> list[Step]:
    """Greedy order of the narrowing steps: repeatedly the step of least added noise per unit saved among each
    knob's next step (a knob narrows one width at a time); steps that save nothing are left out."""
    widths = sorted(widths, reverse=True)
    assign = {k: widths[0] for k in knobs}
    level = {k: 0 for k in knobs}
    order: list[Step] = []
    while True:
        candidates = []
        current = objective(costs, assign, objective_name)
        for knob in knobs:
            if level[knob] + 1 >= len(widths):
                continue
            narrower = {**assign, knob: widths[level[knob] + 1]}
            saving = current - objective(costs, narrower, objective_name)
            if saving <= 0:
                continue
            added = max(0.0, sens.noise_power(knob, narrower[knob]) - sens.noise_power(knob, assign[knob]))
            candidates.append(Step(knob, narrower[knob], saving, added))
        if not candidates:
            return order
        best = min(candidates, key=lambda s: (s.rate, s.knob))
        order.append(best)
        assign[best.knob] = best.bits
        level[best.knob] += 1


def assignment(knobs: Sequence[Knob], widest: int, steps: Sequence[Step]) -> dict[Knob, int]:
    """Every knob's width after ``steps``."""
    widths = {k: widest for k in knobs}
    for step in steps:
        widths[step.knob] = step.bits
    return widths


def mixed_plan(base: QuantPlan, widths: dict[Knob, int], widest: int) -> QuantPlan:
    """``base`` (every tensor at the widest width) with one override per knob narrowed below it."""
    narrowed: dict[str, dict[str, dict[str, int]]] = {}
    for (name, kind), bits in widths.items():
        if bits != widest:
            narrowed.setdefault(name, {})[kind] = {"bits": bits}
    overrides = [LayerOverride(name, **kinds) for name, kinds in narrowed.items()]
    return dataclasses.replace(base, overrides=(*base.overrides, *overrides))


def uniform_label(widths: dict[Knob, int]) -> str:
    """'W8A8'-style label of an assignment with one weight width and one activation width, else ''."""
    w = {b for (_, kind), b in widths.items() if kind == "weight"}
    a = {b for (_, kind), b in widths.items() if kind == "act"}
    return f"uniform W{w.pop()}A{a.pop()}" if len(w) == 1 and len(a) == 1 else ""
