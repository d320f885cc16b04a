"""Quantization plan: global weight / activation specs plus per-layer overrides, loadable from YAML.

Example YAML (every key optional)::

    weight: {bits: 4, scheme: sym, per_channel: true, observer: minmax}
    act: {bits: 4, scheme: asym_u, observer: mse}
    accum_bits: 32          # default: 32 where a layer's weight and input have <= 8 bits, else 64
    fold_bn: true
    quantize_input: true
    overrides:
      - {pattern: "@first", weight: {bits: 8}, act: {bits: 8}}   # first Conv/Linear
      - {pattern: "@last", weight: {bits: 8}, act: {bits: 8}}    # last Conv/Linear
      - {pattern: "@output", act: {bits: 0}}                     # the logits float (the accumulator)
      - {pattern: "layers.3.*", act: {observer: percentile, observer_args: {percentile: 99.9}}}
      - {pattern: "layers.8.conv2", skip: true}                  # leave in float

Patterns are exact module names, ``fnmatch`` globs, ``@first`` / ``@last``, ``@output`` (the Conv/Linear
whose output is the model's output: the logits) or ``input`` (the model input quantizer). Overrides apply in order, later ones win. A quantized activation that absorbs a ReLU (or an
unfolded BatchNorm) is governed by its producer's name, so ``conv1`` covers conv1's weights and the tensor
after its fused ``bn1`` + ``relu``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_quant.quant.errors import QuantConfigError
from lit_quant.quant.yamlio import read_yaml
from lit_quant.quant.spec import (
    ACCUM_BITS,
    DEFAULT_ACT_SPEC,
    DEFAULT_WEIGHT_SPEC,
    QuantSpec,
    check_bool,
    check_choice,
)

FIRST, LAST, OUTPUT, INPUT, DEPTHWISE = "@first", "@last", "@output", "input", "@depthwise"
#: Patterns that name a role in the network rather than a module: they match in every model.
#: ``@depthwise`` is every Conv2d with one input channel per group (``groups == in_channels > 1``).
ROLES: tuple[str, ...] = (INPUT, FIRST, LAST, OUTPUT, DEPTHWISE)
#: Weight width of depthwise convolutions when the other weights are at :data:`LOW_WEIGHT_BITS` or fewer
#: (:meth:`QuantPlan.from_bits`); at 5-7 bits they keep the others' width, which an x86 int8 runtime without
#: VNNI needs (7-bit weights are exact there, 8-bit ones saturate).
DEPTHWISE_BITS = 8
LOW_WEIGHT_BITS = 4

#: What :meth:`QuantPlan.from_bits` chooses beyond the widths, in the words ``quantize.py --help`` shows.
DEFAULTS_TEXT = (
    "weights per output channel, symmetric; the image (the model input) keeps its whole range (a minmax\n"
    "observer) at 8 bits and more; the logits stay float: the last layer's integer accumulator is\n"
    "dequantized, as int8 runtimes can do, since a classifier's answer is the order of a few close logits\n"
    "and an 8-bit grid over their range erases it (--io-bits N quantizes image and logits at N bits, and\n"
    f"the report states what that cost); with {LOW_WEIGHT_BITS}-bit weights or fewer, depthwise convolutions keep\n"
    f"{DEPTHWISE_BITS}-bit weights (--depthwise-bits): nine weights per output channel leave a low-bit grid no\n"
    "error to average out, and they are a few percent of a MobileNet-style model's weights")
_GLOB_CHARS = set("*?[")


def _frozen(mapping: Any, what: str) -> tuple[tuple[str, Any], ...]:
    if mapping is None:
        return ()
    if isinstance(mapping, tuple):
        mapping = dict(mapping)
    if not isinstance(mapping, Mapping):
        raise QuantConfigError(f"{what} must be a mapping of spec fields, got {mapping!r}")
    return tuple((str(k), dict(v) if isinstance(v, Mapping) else v) for k, v in mapping.items())


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise QuantConfigError(f"unknown key(s) {', '.join(unknown)} in {what}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class LayerOverride:
    """Changes for the layers whose name matches ``pattern``.

    Attributes:
        pattern: exact name, glob, ``@first``, ``@last`` or ``input``.
        weight: spec fields to change for weights (e.g. ``{"bits": 8}``; ``{"bits": 0}`` keeps them float).
        act: spec fields to change for the output activation.
        skip: leave the layer (weights and output) in float.
        accum_bits: accumulator width for this layer.
    """

    pattern: str
    weight: Any = ()
    act: Any = ()
    skip: bool = False
    accum_bits: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise QuantConfigError(f"override pattern must be a non-empty string, got {self.pattern!r}")
        object.__setattr__(self, "weight", _frozen(self.weight, f"override {self.pattern!r} weight"))
        object.__setattr__(self, "act", _frozen(self.act, f"override {self.pattern!r} act"))
        if not isinstance(self.skip, bool):
            raise QuantConfigError(f"override {self.pattern!r}: skip must be true or false, got {self.skip!r}")
        if self.accum_bits is not None:
            check_choice(self.accum_bits, ACCUM_BITS, f"override {self.pattern!r} accum_bits")

    def matches(self, name: str, aliases: Iterable[str] = ()) -> bool:
        """True if ``name`` (or one of its aliases such as ``@first``) matches the pattern."""
        if self.pattern in aliases or self.pattern == name:
            return True
        return bool(_GLOB_CHARS & set(self.pattern)) and fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        """One line for reports: ``input a8``, ``@first w8 a8``, ``fc float``, ``conv1 act observer=mse``."""
        parts = [self.pattern]
        for prefix, name, fields in (("w", "weight", dict(self.weight)), ("a", "act", dict(self.act))):
            fields = {k: v for k, v in fields.items() if not (k == "observer_args" and not v)}
            if set(fields) == {"bits"}:
                parts.append(f"{prefix}{fields['bits']}" if fields["bits"] else f"{name} float")
            elif fields:
                parts.append(f"{name} " + ",".join(f"{k}={v}" for k, v in fields.items()))
        if self.skip:
            parts.append("float")
        if self.accum_bits is not None:
            parts.append(f"accum {self.accum_bits}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """YAML form."""
        out: dict[str, Any] = {"pattern": self.pattern}
        if self.weight:
            out["weight"] = dict(self.weight)
        if self.act:
            out["act"] = dict(self.act)
        if self.skip:
            out["skip"] = True
        if self.accum_bits is not None:
            out["accum_bits"] = self.accum_bits
        return out


@dataclass(frozen=True)
class LayerQuant:
    """What one layer gets after overrides: specs (None = float), accumulator bits."""

    weight: QuantSpec | None
    act: QuantSpec | None
    accum_bits: int | None


def _check_act_spec(spec: QuantSpec, where: str) -> None:
    """Activation-only restrictions: LSQ learns one step size per activation tensor (Esser et al. 2020);
    a per-channel activation scale would change shape with the batch layout and is not supported; per-channel
    ``mse`` searches the last observed tensor (a weight), not every calibration batch."""
    if spec.enabled and spec.quantizer == "lsq" and spec.per_channel:
        raise QuantConfigError(f"{where}: LSQ with per-channel activations is not supported; use per_channel: "
                               "false for activations (weights may be per-channel)")
    if spec.enabled and spec.observer == "mse" and spec.per_channel:
        raise QuantConfigError(f"{where}: per-channel mse searches one observed tensor and is for weights; use "
                               "per_channel: false for mse activations")


@dataclass(frozen=True)
class QuantPlan:
    """Global specs + ordered per-layer overrides; validated on construction.

    Attributes:
        weight: spec for Conv2d / Linear weights (``bits=None`` keeps weights float).
        act: spec for activations (``bits=None`` keeps activations float: weight-only quantization).
        overrides: :class:`LayerOverride` tuple, applied in order.
        accum_bits: accumulator width of every quantized layer (the integer engine's; the bias saturates at
            it); None: 32 bits where a layer's weight and input have at most 8 bits, else 64
            (:func:`lit_quant.quant.layers.default_accum_bits`).
        fold_bn: fold BatchNorm into the preceding Conv/Linear (inference / PTQ). QAT keeps it False.
        quantize_input: quantize the model input (where a real backend's ``QuantStub`` sits).
    """

    weight: QuantSpec = DEFAULT_WEIGHT_SPEC
    act: QuantSpec = DEFAULT_ACT_SPEC
    overrides: tuple[LayerOverride, ...] = field(default=())
    accum_bits: int | None = None
    fold_bn: bool = True
    quantize_input: bool = True

    def __post_init__(self) -> None:
        check_bool(self.fold_bn, "plan fold_bn")
        check_bool(self.quantize_input, "plan quantize_input")
        for name in ("weight", "act"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise QuantConfigError(f"plan.{name} must be a QuantSpec, got {getattr(self, name)!r}")
        overrides = tuple(o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in self.overrides)
        object.__setattr__(self, "overrides", overrides)
        if self.accum_bits is not None:
            check_choice(self.accum_bits, ACCUM_BITS, "accum_bits")
        _check_act_spec(self.act, "plan.act")
        for o in overrides:  # fail now, not halfway through prepare, on a bad override field or value
            self.weight.replace(**dict(o.weight))
            _check_act_spec(self.act.replace(**dict(o.act)), f"override {o.pattern!r} act")

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_bits(cls, weight_bits: int | None = 8, act_bits: int | None = 8, *,
                  weight_scheme: str = DEFAULT_WEIGHT_SPEC.scheme, act_scheme: str = DEFAULT_ACT_SPEC.scheme,
                  weight_observer: str = DEFAULT_WEIGHT_SPEC.observer, act_observer: str = DEFAULT_ACT_SPEC.observer,
                  per_channel: bool = DEFAULT_WEIGHT_SPEC.per_channel, narrow_range: bool = False,
                  quantizer: str = "ste",
                  first_last_bits: int | None = None, io_bits: int | None = None,
                  depthwise_bits: int | None = DEPTHWISE_BITS, skip: Iterable[str] = (),
                  accum_bits: int | None = None, fold_bn: bool = True,
                  observer_args: Mapping[str, Mapping[str, Any]] | None = None) -> QuantPlan:
        """The plan behind ``--weight-bits / --act-bits``-style flags; unset choices take the default recipe
        (:data:`~lit_quant.quant.spec.DEFAULT_WEIGHT_SPEC`, :data:`~lit_quant.quant.spec.DEFAULT_ACT_SPEC`),
        which ``quantize.py`` uses too.

        Two tensors are treated apart from the other activations, because they are not like them:

        * the logits (``@output``) stay float, the last layer's accumulator dequantized, as int8 runtimes
          can do, unless ``io_bits`` asks for a width. A classifier's answer is the ordering of a few
          logits; an 8-bit grid over their whole range ties or swaps close ones (docs/RESULTS.md, the zoo);
        * the model input, at 8 bits or more, keeps its full range (a ``minmax`` observer, whatever
          ``act_observer`` is): an image is 8-bit data, so an 8-bit grid over its range loses nothing, and a
          clipping observer removes the brightest pixels every later layer depends on.

        ``first_last_bits`` puts the first and last Conv/Linear (weights, and the first layer's output) and
        the model input at that width; ``io_bits`` puts the model input (the image) and the logits at that
        width, every weight keeping ``weight_bits`` (it comes after ``first_last_bits``, so it wins for those
        two tensors);
        ``depthwise_bits`` is the weight width of depthwise convolutions (``@depthwise``) when ``weight_bits``
        is :data:`LOW_WEIGHT_BITS` or fewer (None or 0: ``weight_bits`` like every other layer): with nine
        weights per output channel a 3x3 depthwise kernel has no other weights to absorb its rounding, and
        such layers hold a few percent of a model's weights (docs/RESULTS.md, the zoo);
        ``skip`` lists layer names (or globs) left in float; ``observer_args`` maps an observer name to its
        options (``{"percentile": {"percentile": 99.9}}``), given to the weight or activation spec using it.
        """
        args = observer_args or {}
        weight = QuantSpec(bits=weight_bits, scheme=weight_scheme, per_channel=per_channel, axis=0,
                           observer=weight_observer, narrow_range=narrow_range, quantizer=quantizer,
                           observer_args=args.get(weight_observer, ()))
        act = QuantSpec(bits=act_bits, scheme=act_scheme, observer=act_observer, quantizer=quantizer,
                        observer_args=args.get(act_observer, ()))
        input_bits = io_bits or first_last_bits or act_bits
        overrides = [LayerOverride(INPUT, act={"observer": "minmax", "observer_args": {}})] \
            if input_bits and input_bits >= 8 and act_observer != "minmax" else []
        if weight_bits and depthwise_bits and weight_bits <= LOW_WEIGHT_BITS < depthwise_bits:
            overrides.append(LayerOverride(DEPTHWISE, weight={"bits": depthwise_bits}))
        overrides += [LayerOverride(p, weight={"bits": first_last_bits}, act={"bits": first_last_bits})
                      for p in (INPUT, FIRST, LAST) if first_last_bits]
        overrides += [LayerOverride(p, act={"bits": io_bits or 0}) for p in (INPUT, OUTPUT) if io_bits or p == OUTPUT]
        overrides += [LayerOverride(name, skip=True) for name in skip]
        return cls(weight, act, tuple(overrides), accum_bits, fold_bn)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        """From the YAML structure in the module docstring; unknown keys raise with the allowed ones."""
        if not isinstance(data, Mapping):
            raise QuantConfigError(f"a quantization plan must be a mapping, got {type(data).__name__}")
        _check_keys(data, [f.name for f in dataclasses.fields(cls)], "quantization plan")
        kwargs = dict(data)
        if "weight" in kwargs:
            kwargs["weight"] = QuantSpec.from_dict(kwargs["weight"], DEFAULT_WEIGHT_SPEC)
        if "act" in kwargs:
            kwargs["act"] = QuantSpec.from_dict(kwargs["act"], DEFAULT_ACT_SPEC)
        overrides = kwargs.get("overrides") or ()
        if not isinstance(overrides, (list, tuple)):
            raise QuantConfigError("plan 'overrides' must be a list of mappings")
        for o in overrides:
            if not isinstance(o, Mapping):
                raise QuantConfigError(f"each override must be a mapping, got {o!r}")
            _check_keys(o, [f.name for f in dataclasses.fields(LayerOverride)], "override")
        kwargs["overrides"] = tuple(LayerOverride(**o) for o in overrides)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantPlan:
        """Load a plan from a YAML file."""
        return cls.from_dict(read_yaml(path, "plan") or {})

    def to_dict(self) -> dict[str, Any]:
        """YAML form (round-trips through :meth:`from_dict`)."""
        return {"weight": self.weight.to_dict(), "act": self.act.to_dict(),
                "overrides": [o.to_dict() for o in self.overrides], "accum_bits": self.accum_bits,
                "fold_bn": self.fold_bn, "quantize_input": self.quantize_input}

    # --- resolution ---------------------------------------------------------------------------------------
    def resolve(self, name: str, aliases: Iterable[str] = ()) -> LayerQuant:
        """Specs for layer ``name`` (with aliases like ``@first``) after applying matching overrides in order."""
        aliases = tuple(aliases)
        weight, act, accum, skip = self.weight, self.act, self.accum_bits, False
        for o in self.overrides:
            if o.matches(name, aliases):
                weight, act = weight.replace(**dict(o.weight)), act.replace(**dict(o.act))
                accum = o.accum_bits if o.accum_bits is not None else accum
                skip = skip or o.skip
        if skip:
            return LayerQuant(None, None, accum)
        return LayerQuant(weight if weight.enabled else None, act if act.enabled else None, accum)

    def check_names(self, names: Iterable[str]) -> None:
        """Raise if an override matches none of ``names`` (or a role of :data:`ROLES`).

        The message lists the closest known names (difflib), since the usual cause is a typo.
        """
        known = list(dict.fromkeys(names))  # a layer reached twice (a folded BatchNorm's owner) is named once
        for o in self.overrides:
            if o.pattern in ROLES or any(o.matches(n) for n in known):
                continue
            close = difflib.get_close_matches(o.pattern, known, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; quantizable layers: {', '.join(known[:20])}"
            raise QuantConfigError(f"plan override {o.pattern!r} matches no quantizable layer{hint}")
