"""Quantization specs: what one tensor (a weight or an activation) is quantized to, validated on construction.

Schemes follow Distiller (``--qe-mode``):

* ``sym``    — signed integers, zero point fixed at 0; range ``[-2^(b-1), 2^(b-1) - 1]``
  (``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``narrow_range``);
* ``asym_u`` — unsigned integers with a zero point; range ``[0, 2^b - 1]`` (``[1, 2^b - 1]`` narrow);
* ``asym_s`` — signed integers with a zero point; range ``[-2^(b-1), 2^(b-1) - 1]`` (lowest value dropped
  when narrow).

``bits`` of ``0`` or ``None`` means "leave this tensor in float".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lit_quant.quant.errors import QuantConfigError

SCHEMES: tuple[str, ...] = ("sym", "asym_u", "asym_s")
#: Observer names; :mod:`lit_quant.quant.observers` registers one class per name (checked at import).
OBSERVER_NAMES: tuple[str, ...] = ("minmax", "ema", "percentile", "mse", "entropy", "nstd", "avg")
#: Observers that can keep one range per channel.
PER_CHANNEL_OBSERVERS: tuple[str, ...] = ("minmax", "ema", "nstd", "avg", "mse")
#: ``ste``: fixed scale from the observer, straight-through rounding; ``lsq``: learned step size (QAT).
QUANTIZERS: tuple[str, ...] = ("ste", "lsq")
#: Weight roundings of :func:`lit_quant.quant.layerwise.layerwise_ptq`.
ROUNDINGS: tuple[str, ...] = ("nearest", "gptq", "adaround")
MIN_BITS, MAX_BITS = 2, 16
ACCUM_BITS: tuple[int, ...] = (16, 24, 32, 64)


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise :class:`QuantConfigError` unless ``MIN_BITS <= bits <= MAX_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS} (or 0/None to keep float), "
                               f"got {bits!r}")


def check_bool(value: Any, what: str) -> None:
    """Raise :class:`QuantConfigError` unless ``value`` is ``True`` or ``False``: a YAML ``"no"`` string is
    truthy in Python and would silently mean yes."""
    if not isinstance(value, bool):
        raise QuantConfigError(f"{what} must be true or false, got {value!r}")


def check_choice(value: Any, allowed: tuple, what: str) -> None:
    """Raise :class:`QuantConfigError` naming the allowed values unless ``value in allowed``."""
    if value not in allowed:
        raise QuantConfigError(f"{what} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    Attributes:
        bits: integer width, 2..16; ``0`` or ``None`` keeps the tensor in float (``enabled`` is False).
        scheme: ``sym``, ``asym_u`` or ``asym_s`` (see module docstring).
        narrow_range: drop the lowest integer so a symmetric range is balanced (``[-127, 127]`` at 8 bits).
        per_channel: one scale / zero point per slice along ``axis`` (weights: output channels, ``axis=0``).
        axis: channel axis for per-channel quantization.
        observer: name of the range statistic, one of :data:`OBSERVER_NAMES`.
        observer_args: options for the observer (e.g. ``{"percentile": 99.99}``); stored as sorted
            ``(key, value)`` pairs so the spec stays hashable; read them with :attr:`observer_options`.
        quantizer: ``ste`` (observer-driven scale) or ``lsq`` (learned scale, for QAT below 8 bits; weights
            at 8 bits and more keep observer ranges, see :func:`lit_quant.quant.fake_quant.build_fake_quantize`).
    """

    bits: int | None = 8
    scheme: str = "sym"
    narrow_range: bool = False
    per_channel: bool = False
    axis: int = 0
    observer: str = "minmax"
    observer_args: Any = field(default=())
    quantizer: str = "ste"

    def __post_init__(self) -> None:
        if self.bits in (None, 0):
            object.__setattr__(self, "bits", None)
        else:
            check_bits(self.bits)
        check_bool(self.narrow_range, "narrow_range")
        check_bool(self.per_channel, "per_channel")
        check_choice(self.scheme, SCHEMES, "scheme")
        check_choice(self.observer, OBSERVER_NAMES, "observer")
        check_choice(self.quantizer, QUANTIZERS, "quantizer")
        if self.per_channel and self.observer not in PER_CHANNEL_OBSERVERS:
            raise QuantConfigError(f"observer {self.observer!r} is per-tensor only; per-channel observers: "
                                   f"{', '.join(PER_CHANNEL_OBSERVERS)}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or self.axis < 0:
            raise QuantConfigError(f"axis must be a non-negative integer, got {self.axis!r}")
        args = self.observer_args
        if isinstance(args, Mapping):
            args = tuple(sorted(args.items()))
        try:
            args = tuple((str(k), v) for k, v in args)
        except (TypeError, ValueError):
            raise QuantConfigError(f"observer_args must be a mapping of option names to values, got {args!r}") from None
        object.__setattr__(self, "observer_args", args)
        if self.enabled and self.quant_min >= self.quant_max:
            raise QuantConfigError(f"empty integer range for {self}")

    @property
    def enabled(self) -> bool:
        """True when the tensor is quantized (``bits`` set)."""
        return self.bits is not None

    @property
    def signed(self) -> bool:
        """True for ``sym`` and ``asym_s`` (integers stored as signed)."""
        return self.scheme != "asym_u"

    @property
    def quant_min(self) -> int:
        """Lowest integer: ``-2^(b-1)`` signed, ``0`` unsigned; one more with ``narrow_range``."""
        self._require_enabled()
        low = -(2 ** (self.bits - 1)) if self.signed else 0
        return low + int(self.narrow_range)

    @property
    def quant_max(self) -> int:
        """Highest integer: ``2^(b-1) - 1`` signed, ``2^b - 1`` unsigned."""
        self._require_enabled()
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def observer_options(self) -> dict[str, Any]:
        """Observer options as a plain dict."""
        return dict(self.observer_args)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with ``changes`` applied (and validated); unknown field names raise :class:`QuantConfigError`."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise QuantConfigError(f"unknown spec field(s) {', '.join(unknown)}; allowed: {', '.join(spec_fields())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML / JSON friendly); :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["observer_args"] = dict(self.observer_args)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: QuantSpec | None = None) -> QuantSpec:
        """Build a spec from a mapping; fields missing from ``data`` come from ``base`` (or the defaults)."""
        if not isinstance(data, Mapping):
            raise QuantConfigError(f"a quantization spec must be a mapping of {', '.join(spec_fields())}; got {data!r}")
        return (base or cls()).replace(**dict(data))

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise QuantConfigError("this spec keeps the tensor in float (bits=None): it has no integer range")


def spec_fields() -> tuple[str, ...]:
    """Names of the :class:`QuantSpec` fields (for error messages and YAML validation)."""
    return tuple(f.name for f in dataclasses.fields(QuantSpec))


#: The default recipe, read by the library (:meth:`lit_quant.quant.plan.QuantPlan.from_bits`, YAML plans) and
#: by ``quantize.py``'s flags alike. Weights: signed symmetric per output channel, each channel's whole range
#: (a weight outlier is rare and real). Activations: unsigned affine per tensor, the range that minimises the
#: squared quantization error (``mse``), which clips rare outliers where min/max would spend the grid on them.
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, scheme="sym", per_channel=True, axis=0, observer="minmax")
DEFAULT_ACT_SPEC = QuantSpec(bits=8, scheme="asym_u", observer="mse")
