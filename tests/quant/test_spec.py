"""Spec validation: invalid combinations fail on construction with the allowed values in the message."""

from __future__ import annotations

import pytest

from lit_quant.quant import OBSERVER_NAMES, QuantConfigError, QuantSpec


@pytest.mark.parametrize("bits", [1, 17, 2.5, True, -8, "8"])
def test_bits_outside_2_16_fail(bits: object) -> None:
    with pytest.raises(QuantConfigError, match="2..16"):
        QuantSpec(bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [0, None])
def test_bits_zero_or_none_keeps_float(bits: object) -> None:
    spec = QuantSpec(bits=bits)  # type: ignore[arg-type]
    assert not spec.enabled and spec.bits is None


def test_unknown_names_list_allowed_values() -> None:
    with pytest.raises(QuantConfigError, match="sym, asym_u, asym_s"):
        QuantSpec(scheme="symmetric")
    with pytest.raises(QuantConfigError, match=", ".join(OBSERVER_NAMES)):
        QuantSpec(observer="histogram")
    with pytest.raises(QuantConfigError, match="ste, lsq"):
        QuantSpec(quantizer="pact")


def test_per_channel_histogram_observer_rejected() -> None:
    with pytest.raises(QuantConfigError, match="per-tensor only; per-channel observers: minmax"):
        QuantSpec(per_channel=True, observer="percentile")


@pytest.mark.parametrize("scheme,narrow,bits,expected", [
    ("sym", False, 8, (-128, 127)), ("sym", True, 8, (-127, 127)), ("asym_u", False, 8, (0, 255)),
    ("asym_s", False, 4, (-8, 7)), ("asym_u", False, 16, (0, 65535)), ("sym", False, 2, (-2, 1))])
def test_integer_ranges(scheme: str, narrow: bool, bits: int, expected: tuple[int, int]) -> None:
    spec = QuantSpec(bits=bits, scheme=scheme, narrow_range=narrow)
    assert (spec.quant_min, spec.quant_max) == expected


def test_spec_is_frozen_hashable_and_round_trips() -> None:
    spec = QuantSpec(bits=4, observer="percentile", observer_args={"percentile": 99.9})
    assert spec.observer_options == {"percentile": 99.9}
    assert hash(spec) == hash(QuantSpec.from_dict(spec.to_dict()))
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(AttributeError):
        spec.bits = 8  # type: ignore[misc]
    with pytest.raises(QuantConfigError, match="unknown spec field"):
        spec.replace(bitz=3)
