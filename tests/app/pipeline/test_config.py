"""The rules between quantize.py's flags, without Lightning: shorthands, QAT-only flags, sweeps, the
mode-dependent activation observer, choice flags; and the parsers build without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

import quantize
from lit_quant.app.cli import run_cli
from lit_quant.app.pipeline.config import QuantizeConfig, resolve_request
from lit_quant.app.recipes import qat_recipe
from lit_quant.errors import UserError


def _request(*argv: str):
    return resolve_request(vars(quantize.build_parser().parse_args(list(argv))))


def test_bits_and_scheme_shorthands_fill_only_what_is_not_given() -> None:
    cfg = _request("--bits", "4", "--act-bits", "8", "--scheme", "asym_s").config
    assert (cfg.weight_bits, cfg.act_bits) == (4, 8)
    assert cfg.weight_scheme == cfg.act_scheme == "asym_s"


def test_several_bits_or_sweep_make_a_sweep() -> None:
    request = _request("--bits", "8", "4")
    assert request.sweep_bits == [8, 4] and request.observers is None
    assert _request("--sweep").sweep_bits == [16, 8, 6, 4, 3, 2]


def test_act_observer_default_depends_on_the_mode_and_is_resolved() -> None:
    assert _request().config.act_observer == "mse"
    assert _request("--mode", "qat").config.act_observer == "ema"
    assert _request("--mode", "qat", "--act-observer", "minmax").config.act_observer == "minmax"
    assert QuantizeConfig(mode="qat").act_observer == "ema"


@pytest.mark.parametrize("bits,expected", [
    (8, ("ste", "ema", "minmax", "nearest", False, 0.0, 5, False, None, 0)),
    (16, ("ste", "ema", "minmax", "nearest", False, 0.0, 5, False, None, 0)),
    (4, ("lsq", "mse", "mse", "gptq", True, 1.0, 5, False, 8, 4)),
    (3, ("lsq", "mse", "mse", "gptq", True, 1.0, 8, True, 8, 7)),
    (2, ("lsq", "mse", "mse", "gptq", True, 1.0, 30, True, 8, 29))])
def test_qat_recipe_by_width_fills_only_what_is_not_given(bits: int, expected: tuple) -> None:
    cfg = _request("--mode", "qat", "--bits", str(bits)).config
    assert (cfg.qat_method, cfg.act_observer, cfg.weight_observer, cfg.weight_rounding, cfg.bias_correction,
            cfg.warmup_epochs, cfg.epochs, cfg.distill, cfg.first_last_bits, cfg.freeze_bn_epoch) == expected
    assert cfg.recipe == qat_recipe(bits, bits) and sorted(cfg.from_recipe) == sorted(
        ["qat_method", "act_observer", "weight_observer", "weight_rounding", "bias_correction", "warmup_epochs",
         "epochs", "distill", "freeze_bn_epoch"] + (["first_last_bits"] if bits < 8 else []))
    # every flag overrides its recipe value; --io-bits or --plan replace the recipe's first/last layers
    mine = _request("--mode", "qat", "--bits", str(bits), "--qat-method", "ste", "--epochs", "7",
                    "--warmup-epochs", "0.5", "--act-observer", "percentile", "--io-bits", "8",
                    "--weight-rounding", "nearest", "--no-bias-correction", "--no-distill").config
    assert (mine.qat_method, mine.epochs, mine.warmup_epochs, mine.act_observer, mine.first_last_bits,
            mine.weight_rounding, mine.bias_correction, mine.distill) == \
        ("ste", 7, 0.5, "percentile", None, "nearest", False, False)
    # BatchNorm folds in the last of the epochs given below 8 bits; a given --freeze-bn-epoch wins
    assert mine.freeze_bn_epoch == (6 if bits < 8 else 0)
    assert _request("--mode", "qat", "--bits", str(bits), "--freeze-bn-epoch", "2").config.freeze_bn_epoch == 2
    # the narrower width decides; PTQ keeps its own defaults (the PTQ recipe's steps, test below)
    assert _request("--mode", "qat", "--weight-bits", "4", "--act-bits", "8").config.qat_method == "lsq"
    ptq = _request("--bits", str(bits)).config
    assert (ptq.act_observer, ptq.weight_observer, ptq.first_last_bits, ptq.distill, ptq.freeze_bn_epoch) == \
        ("mse", "minmax", None, False, 0)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--bits", "8"], (False, "nearest", False)),
    (["--bits", "4"], (False, "gptq", True)),
    (["--weight-bits", "4", "--act-bits", "8"], (False, "gptq", True)),
    (["--bits", "16", "--ptq-recipe", "adaround"], (False, "adaround", True)),
    (["--bits", "4", "--ptq-recipe", "nearest"], (False, "nearest", False)),
    (["--bits", "4", "--cle", "--weight-rounding", "adaround"], (True, "adaround", True)),
    (["--bits", "4", "--stats-file", "stats.yaml", "--ptq-recipe", "nearest"], (False, "nearest", False))])
def test_ptq_recipe_by_width_fills_only_what_is_not_given(flags: list[str], expected: tuple) -> None:
    """auto: round-to-nearest at 8 bits and more, GPTQ + bias correction below; a named recipe at any width;
    each flag given wins."""
    cfg = _request(*flags).config
    assert (cfg.cle, cfg.weight_rounding, cfg.bias_correction) == expected


def test_an_epoch_count_below_the_recipe_warm_up_is_one_line(capsys) -> None:
    with pytest.raises(UserError, match="--epochs 1 leaves no training after the 1 warm-up epoch.s. of the 4-bit QAT "
                                        "recipe"):
        _request("--mode", "qat", "--bits", "4", "--epochs", "1")
    assert _request("--mode", "qat", "--bits", "4", "--epochs", "1", "--warmup-epochs", "0").config.epochs == 1


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "3"], "--epochs is a QAT setting: add --mode qat"),
    (["--sweep", "--mode", "qat"], "need --mode ptq or compare"),
    (["--save-checkpoints"], "--save-checkpoints is a setting of --sweep"),
    (["--name", "a/b"], "--name must be a plain folder name"),
])
def test_flag_rules(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        _request(*argv)


def test_choice_flags_refuse_other_values_with_one_line(capsys) -> None:
    assert run_cli(quantize.main, ["--mode", "int4"], prog="quantize.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid --mode 'int4'; choose from ptq, qat, builtin" in err


@pytest.mark.parametrize("script", ["train", "quantize"])
def test_parsers_build_without_torch_or_lightning(script: str) -> None:
    code = (f"import sys, {script}; {script}.build_parser().format_help(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'pytorch_lightning', 'lightning', 'lightning_fabric')); print(heavy[:5]); "
            "sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
