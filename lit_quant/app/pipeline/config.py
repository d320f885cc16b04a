"""``quantize.py``'s settings and every rule about them, in one place: the :class:`QuantizeConfig` fields
(flag, help, allowed values), their validation, and the rules between flags (the ``--bits`` / ``--scheme``
shorthands, QAT-only flags, sweeps, the mode-dependent activation observer).

Light on purpose: no torch, no Lightning at module level, so building the parser (``quantize.py --help``)
costs a fraction of a second. The allowed values the quantization core and the exporters define come from
their torch-free modules (:mod:`lit_quant.quant.spec`, :mod:`lit_quant.deploy.options`); checks that need
the heavy modules import them inside :meth:`QuantizeConfig.validate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lit_quant.app.config import (
    MAX_BATCH,
    HardwareConfig,
    block,
    check_choices,
    check_folder_name,
    check_seed,
    check_warmup,
    option,
    resolve_config,
)
from lit_quant.app.recipes import PTQ_RECIPES, RECIPE_FIELDS, QATRecipe, ptq_recipe, qat_recipe
from lit_quant.deploy.options import BACKENDS, DEFAULT_OPSET, DEFAULT_SCALE_APPROX_BITS
from lit_quant.errors import UserError
from lit_quant.quant.errors import QuantConfigError
from lit_quant.quant.plan import DEPTHWISE_BITS, LOW_WEIGHT_BITS
from lit_quant.quant.spec import (
    DEFAULT_ACT_SPEC,
    DEFAULT_WEIGHT_SPEC,
    MAX_BITS,
    MIN_BITS,
    OBSERVER_NAMES,
    ROUNDINGS,
    SCHEMES,
    check_bits,
)

MODES = ("ptq", "qat", "builtin", "compare", "dynamic", "half")
EXPORTS = ("int8", "integer", "onnx", "pt2e", "executorch")
QAT_METHODS = ("ste", "lsq")
#: ``--sweep``: the widths of the accuracy-against-bits figure.
SWEEP_BITS = (16, 8, 6, 4, 3, 2)
#: Widths of ``--sensitivity`` without ``--bits``; ``--max-drop`` without ``--bits`` chooses between 8 and 4.
SENSITIVITY_BITS = (8, 4, 3, 2)
SEARCH_BITS = (8, 4)
#: How a row's note starts the sentence on what its quantized logits cost (``quantize.py`` prints it).
LOGITS_COST = "logits at "
#: Flags that only mean something for ``--mode qat``.
QAT_ONLY = ("epochs", "lr", "warmup_epochs", "qat_method", "distill", "distill_weight", "distill_temperature",
            "freeze_observers_epoch", "freeze_bn_epoch", "precision", "opt_level", "resume")


def plan_widths(path: str) -> tuple[int, int] | None:
    """The narrowest weight and activation widths a plan YAML quantizes with (globally or in an override);
    None when the file cannot be read as a plan (loading it again later reports why) or keeps either kind
    float everywhere."""
    from lit_quant.quant import QuantConfigError, QuantPlan

    try:
        plan = QuantPlan.from_yaml(path)
    except (OSError, QuantConfigError):
        return None
    found = []
    for kind in ("weight", "act"):
        bits = [getattr(plan, kind).bits] + [dict(getattr(o, kind)).get("bits") for o in plan.overrides]
        found.append(min((b for b in bits if b), default=None))
    return (found[0], found[1]) if found[0] and found[1] else None


@dataclass
class QuantizeConfig:
    """Everything ``quantize.py`` needs; see the README for each flag."""

    ckpt: str | None = option(None, "fp32 checkpoint (default: the newest best.ckpt under --checkpoint-dir)")
    eval: str | None = option(None, "re-evaluate a quantized checkpoint written by an earlier run (ptq-w*a*.ckpt)")
    checkpoint_dir: str = option("checkpoints", "root folder of runs; reports go to the checkpoint's run folder")
    name: str | None = option(None, "name of this run's report folder <run>/quantize/<name>/ (default: the UTC "
                              "time, e.g. 20261203-093000)")
    save_checkpoints: bool = option(False, "with --sweep / several --bits / --observers: also keep each "
                                    "point's ptq-w*a*.ckpt (a single-width run always keeps its own)")
    mode: str = option("ptq", "ptq (fp32, ours, torch.ao --backend), qat (fp32, PTQ, our QAT, torch.ao QAT), builtin (torch.ao only), compare (fp32, ours, "
                       "torch.ao on every backend of this CPU), dynamic (torch.ao dynamic int8 Linear), half (16-bit copy)", choices=MODES)
    weight_bits: int = option(8, f"weight bits, {MIN_BITS}..{MAX_BITS}")
    act_bits: int = option(8, f"activation bits, {MIN_BITS}..{MAX_BITS}")
    weight_scheme: str = option(DEFAULT_WEIGHT_SPEC.scheme, "weight scheme", choices=SCHEMES)
    act_scheme: str = option(DEFAULT_ACT_SPEC.scheme, "activation scheme", choices=SCHEMES)
    per_channel: bool = option(DEFAULT_WEIGHT_SPEC.per_channel, "per-channel weight quantization "
                               "(--no-per-channel: per tensor)")
    weight_observer: str | None = option(None, f"weight observer (default: {DEFAULT_WEIGHT_SPEC.observer}; the QAT "
                                         "recipe's below 8 bits)", choices=OBSERVER_NAMES)
    act_observer: str | None = option(None, f"activation observer (default: {DEFAULT_ACT_SPEC.observer}; the QAT "
                                      "recipe's with --mode qat)", choices=OBSERVER_NAMES)
    weight_rounding: str | None = option(None, "PTQ weight rounding on the calibrated grid: nearest; gptq (each "
                                         "layer's rounding error compensated by its remaining weights on the "
                                         "calibration inputs, Frantar et al. 2022); adaround (each weight rounded "
                                         "up or down as learned on the calibration inputs, Nagel et al. 2020) "
                                         "(default: the --ptq-recipe's; the QAT recipe's with --mode qat)",
                                         choices=ROUNDINGS)
    ptq_recipe: str = option("auto", "PTQ steps after range calibration that --weight-rounding and "
                             "--bias-correction do not give: nearest (none), gptq (GPTQ, bias correction), "
                             "adaround (AdaRound, bias correction), auto (nearest at 8 bits and more, gptq "
                             "below)", choices=("auto", *PTQ_RECIPES))
    cle: bool = option(False, "PTQ rows: cross-layer equalization of conv/linear pairs joined by a ReLU (or "
                       "nothing), with bias absorption (Nagel et al. 2019), before calibration")
    adaround_iters: int = option(2000, "--weight-rounding adaround: Adam steps per layer, >= 1")
    adaround_lr: float = option(0.01, "--weight-rounding adaround: Adam learning rate, > 0")
    bias_correction: bool | None = option(None, "PTQ: shift each layer's bias so that its mean output per channel on "
                                          "the calibration images equals the float model's (empirical bias "
                                          "correction) (default: the --ptq-recipe's; the QAT recipe's with --mode qat)")
    percentile: float = option(99.99, "clipping percentile of the 'percentile' observer, in (50, 100]")
    n_std: float = option(3.0, "clip at mean +- N standard deviations with the 'nstd' observer")
    first_last_bits: int | None = option(None, "bits of the input image and the first and last layers (e.g. 8 with low "
                                         "--bits; the QAT recipe's below 8 bits unless --io-bits or --plan is given)")
    io_bits: int | None = option(None, "bits of the model input (the image) and output (the logits) only; every "
                                 "weight keeps --weight-bits (default: float logits, the last layer's accumulator "
                                 "dequantized as int8 runtimes can do, since quantized logits tie or swap close "
                                 "classes; the image at the activation width, its whole range kept at 8 bits and "
                                 "more); quantized logits add what they cost to the row's note")
    depthwise_bits: int = option(DEPTHWISE_BITS, "weight bits of depthwise convolutions when --weight-bits is "
                                 f"{LOW_WEIGHT_BITS} or fewer (0: --weight-bits like every other layer; why: "
                                 "the defaults below)")
    no_quant_layers: tuple[str, ...] = option((), "layers left in float: names or globs (fc 'layers.0.*')")
    plan: str | None = option(None, "YAML quantization plan with per-layer overrides (replaces the bit/scheme flags)")
    stats_file: str | None = option(None, "calibration statistics YAML: reused when it exists, else written")
    sensitivity: bool = option(False, "measure each layer's weights and output activation alone at each --bits "
                               "width (default 8 4 3 2), everything else float: SQNR of the logits and validation "
                               "top-1 drop, as a table, sensitivity.png and sensitivity.json")
    max_drop: float | None = option(None, "search per-layer widths among --bits (default 8 4) for the smallest "
                                    "model (--search-objective) whose validation top-1 stays within this many "
                                    "points of fp32; writes mixed-plan.yaml for --plan and adds its PTQ row")
    search_objective: str = option("size", "what --max-drop minimises: size (packed weight bytes) or bitops "
                                   "(MACs x weight bits x input bits)", choices=("size", "bitops"))
    sensitivity_images: int = option(1024, "--sensitivity / --max-drop: validation images of each pass")
    calib_batches: int = option(32, "training batches used for calibration")
    # Larger than train.py's 64: no gradients are kept, so evaluation and calibration batches can be bigger.
    batch_size: int = option(128, "batch size per process of calibration and evaluation (larger than train.py's: "
                             "no gradients to keep)")
    backend: str = option("x86", "torch.ao backend of the built-in row", choices=BACKENDS)
    hardware: HardwareConfig = block(HardwareConfig)
    # QAT
    epochs: int | None = option(None, "QAT: fine-tuning epochs, ours and torch.ao's (default: the recipe's)")
    lr: float | None = option(None, "QAT: peak learning rate, cosine decay (default: the recipe's fraction of the "
                              "fp32 run's)")
    warmup_epochs: float | None = option(None, "QAT: linear learning-rate warm-up from 1/100 of --lr over this many "
                                         "epochs (fractions allowed; 0: none; default: the recipe's)")
    qat_method: str | None = option(None, "QAT: ste (fixed-range fake quant, observers, straight-through rounding) "
                                    "or lsq (learned step sizes of activations at 2-8 bits and of weights below 8 "
                                    "bits; 8-bit weights keep ranges that follow them) (default: the recipe's)",
                                    choices=QAT_METHODS)
    distill: bool | None = option(None, "QAT: knowledge distillation from the fp32 model (the teacher) for ours and "
                                  "torch.ao's QAT alike; loss (1-w) CE + w T^2 KL(teacher || student) (default: "
                                  "the recipe's)")
    distill_weight: float = option(1.0, "QAT with --distill: weight w of the distillation term, in [0, 1]")
    distill_temperature: float = option(1.0, "QAT with --distill: softmax temperature T, positive")
    freeze_observers_epoch: int | None = option(None, "QAT: stop updating ranges from this epoch (0-based; "
                                                "unset: never)")
    freeze_bn_epoch: int | None = option(None, "QAT: freeze BatchNorm statistics from this epoch (0-based; 0: fold "
                                         "the fp32 running statistics from the start; >= --epochs: BatchNorm trains "
                                         "all run) (default: the recipe's: 0 at 8 bits and more, the last epoch "
                                         "below)")
    resume: str | None = option(None, "QAT: continue from 'last' (the run's qat-w<W>a<A>/last.ckpt) or a path")
    seed: int = option(42, "QAT: random seed of shuffling and augmentation")
    builtin_qat: bool = option(True, "QAT: also train torch.ao's prepare_qat_fx model (same epochs and data)")
    # deployment
    export: tuple[str, ...] = option((), "deploy each PTQ / QAT result: int8 (torch.ao kernels with our qparams), "
                                     "integer (integer-only reference engine), onnx (QDQ model run by onnxruntime), "
                                     "pt2e (torch.export program with torchao's PT2E quantize / dequantize ops, "
                                     "compiled to int8 kernels by Inductor; needs torchao), executorch (.pte program "
                                     "with the XNNPACK delegate, run by executorch.runtime; needs executorch)",
                                     choices=EXPORTS)
    accum_bits: int | None = option(None, "--export integer: accumulator bits of every layer (default: the plan's; 32 "
                                    "where a layer's weight and input have <= 8 bits, else 64); "
                                    "overflows are counted and reported")
    scale_approx_bits: int = option(DEFAULT_SCALE_APPROX_BITS, "--export integer: bits of the fixed-point "
                                    "requantization multiplier M0 (M ~ M0 / 2^n; 31 = gemmlowp / TFLite's Q31)")
    explain: str | None = option(None, "print the integer dataflow of this layer (bit widths, scales, multiplier)")
    onnx_opset: int = option(DEFAULT_OPSET, "--export onnx: ONNX opset (13 or newer: per-channel QuantizeLinear)")
    latency: bool = option(True, "measure CPU latency at batch 1 and 64 (1 thread, rank 0 only)")
    progress: bool | None = option(None, "rich progress bars for calibration, QAT and evaluation; unset (None): "
                                   "on when stderr is a terminal")

    def __post_init__(self) -> None:
        # A plan replaces the bit flags; its narrowest widths choose the PTQ and QAT recipes, as --bits would.
        widths = plan_widths(self.plan) if isinstance(self.plan, str) else None
        if widths is not None:
            self.weight_bits, self.act_bits = widths
        # The recipe's values are part of the resolved config: reports, notes and a saved config show them.
        recipe = self.recipe
        self.from_ptq_recipe = []
        if recipe is None and isinstance(self.weight_bits, int) and isinstance(self.act_bits, int) \
                and self.ptq_recipe in ("auto", *PTQ_RECIPES):
            steps = ptq_recipe(self.ptq_recipe, self.weight_bits, self.act_bits)
            self.from_ptq_recipe = [name for name in ("weight_rounding", "bias_correction")
                                    if getattr(self, name) is None]
            for name in self.from_ptq_recipe:
                setattr(self, name, getattr(steps, name))
        self.from_recipe = [name for name in RECIPE_FIELDS if getattr(self, name) is None]
        for name in self.from_recipe:
            setattr(self, name, getattr(recipe, name) if recipe is not None else RECIPE_FIELDS[name])
        if recipe is not None and self.first_last_bits is None and self.io_bits is None and self.plan is None \
                and recipe.first_last_bits is not None:
            self.first_last_bits = recipe.first_last_bits
            self.from_recipe.append("first_last_bits")
        if self.freeze_bn_epoch is None:  # follows --epochs, given or the recipe's
            self.freeze_bn_epoch = recipe.freeze_bn_epoch(self.epochs) if recipe is not None else 0
            self.from_recipe.append("freeze_bn_epoch")

    @property
    def recipe(self) -> QATRecipe | None:
        """The QAT recipe of this width (:func:`qat_recipe`); None outside ``--mode qat``."""
        if self.mode != "qat" or not isinstance(self.weight_bits, int) or not isinstance(self.act_bits, int):
            return None
        return qat_recipe(self.weight_bits, self.act_bits)

    def validate(self) -> None:
        """Range checks with one-line messages."""
        for name in ("weight_bits", "act_bits", "first_last_bits", "io_bits", "depthwise_bits"):
            value = getattr(self, name)
            if value is not None and not (name == "depthwise_bits" and value == 0):
                check_bits_flag(value, name)
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.n_std <= 0:
            raise UserError(f"--n-std must be positive, got {self.n_std}")
        if self.plan is not None and self.depthwise_bits != DEPTHWISE_BITS:
            raise UserError("--depthwise-bits is a setting of the bit flags; with --plan, write an override of "
                            "@depthwise in the plan")
        if self.cle and self.stats_file:
            raise UserError("--cle with --stats-file: the statistics would be of the model before equalization; "
                            "give one of them")
        if not self.adaround_lr > 0:  # also refuses NaN
            raise UserError(f"--adaround-lr must be positive, got {self.adaround_lr}")
        if self.max_drop is not None and not self.max_drop >= 0:  # also refuses NaN
            raise UserError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if (self.sensitivity or self.max_drop is not None) and (self.mode != "ptq" or self.plan is not None):
            raise UserError("--sensitivity / --max-drop work on --mode ptq without --plan (they write the plan; "
                            "--mode qat --plan <the found plan> trains it)")
        self.hardware.validate()
        for name in ("calib_batches", "batch_size", "adaround_iters", "sensitivity_images"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH:
            raise UserError(f"--batch-size must be at most {MAX_BATCH}, got {self.batch_size}")
        check_seed(self.seed)
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if "warmup_epochs" in self.from_recipe and "epochs" not in self.from_recipe \
                and not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"--epochs {self.epochs} leaves no training after the {self.warmup_epochs:g} warm-up "
                            f"epoch(s) of the {min(self.weight_bits, self.act_bits)}-bit QAT recipe; pass more "
                            "--epochs or a shorter --warmup-epochs")
        check_warmup(self.warmup_epochs, self.epochs)
        if self.mode == "qat" and self.qat_method == "lsq":
            # LSQ (Esser et al. 2020) learns the step size of a 2-8-bit grid; a wider grid keeps the ranges its
            # observers set (STE), as every wider QAT here does
            wide = [f"--{name.replace('_', '-')} {value}" for name in ("weight_bits", "act_bits")
                    if (value := getattr(self, name)) is not None and value > 8]
            if wide:
                raise UserError(f"--qat-method lsq is for widths of at most 8 bits, got {wide[0]}; use --qat-method "
                                "ste above 8 bits")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise UserError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if not self.distill and (self.distill_weight != 1.0 or self.distill_temperature != 1.0):
            raise UserError("--distill-weight / --distill-temperature are settings of --distill: add --distill")
        for name in ("freeze_observers_epoch", "freeze_bn_epoch"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a non-negative epoch, got {value}")
        if self.name is not None:
            check_folder_name(self.name, "--name")
        unknown = [e for e in self.export if e not in EXPORTS]
        if unknown:
            raise UserError(f"invalid --export '{unknown[0]}'; choose from {', '.join(EXPORTS)}")
        if (self.export or self.explain) and self.mode not in ("ptq", "compare", "qat"):
            raise UserError("--export / --explain deploy our quantized model: use --mode ptq, compare or qat")
        if "integer" not in self.export and (self.accum_bits is not None or self.scale_approx_bits != DEFAULT_SCALE_APPROX_BITS):
            raise UserError("--accum-bits / --scale-approx-bits are settings of the integer engine: add --export integer")
        if "onnx" not in self.export and self.onnx_opset != DEFAULT_OPSET:
            raise UserError("--onnx-opset is a setting of --export onnx")
        check_choices(self)
        self._validate_heavy()

    def _validate_heavy(self) -> None:
        """The checks that need the exporters and the precision plugin (torch, Lightning): imported here so
        that building the parser stays light."""
        from lit_quant.deploy.integer import check_engine_widths
        from lit_quant.deploy.onnx_export import check_opset
        from lit_quant.deploy.pt2e import check_pt2e_runtime
        from lit_quant.deploy.pte import check_executorch_runtime
        from lit_quant.app.precision import resolve_precision

        check_engine_widths(self.accum_bits, self.scale_approx_bits)
        if "onnx" in self.export:
            check_opset(self.onnx_opset)
        if "pt2e" in self.export:
            check_pt2e_runtime()
        if "executorch" in self.export:
            check_pt2e_runtime()
            check_executorch_runtime()
        resolve_precision(self.hardware.precision, self.hardware.opt_level, on_cuda=False)  # both given, or an unknown value


@dataclass
class QuantizeRequest:
    """A resolved command line: the config, and the sweep's widths and observers (None when not sweeping)."""

    config: QuantizeConfig
    sweep_bits: list[int] | None
    observers: list[str] | None


def check_bits_flag(value: int, name: str) -> None:
    """The width range of :func:`lit_quant.quant.spec.check_bits`, as a one-line error naming the flag."""
    try:
        check_bits(value)
    except QuantConfigError:
        raise UserError(f"--{name.replace('_', '-')} must be in {MIN_BITS}..{MAX_BITS}, got {value}") from None


def resolve_request(args: Mapping[str, Any]) -> QuantizeRequest:
    """Apply the rules between flags to parsed flags (given ones only, as ``add_config_arguments`` leaves
    them) and build the validated config.

    ``sweep`` (bool) sweeps :data:`SWEEP_BITS`; ``bits`` (a list) sets both weight and activation widths,
    several values run a sweep; ``scheme`` sets both schemes; each shorthand fills only the flags not given.
    QAT-only flags need ``--mode qat``; a sweep or ``observers`` needs ``--mode ptq`` or ``compare``.
    """
    args = dict(args)
    sweep = list(SWEEP_BITS) if args.pop("sweep", False) else None
    observers = args.pop("observers", None)
    bits = args.pop("bits", None)
    if args.get("sensitivity") or args.get("max_drop") is not None:
        if sweep or observers:
            raise UserError("--sensitivity / --max-drop take their widths from --bits; drop --sweep / --observers")
        default = SEARCH_BITS if args.get("max_drop") is not None else SENSITIVITY_BITS
        sweep, bits = sorted(set(bits or default), reverse=True), None
        if args.get("max_drop") is not None and len(sweep) < 2:
            raise UserError(f"--max-drop chooses between widths: give two or more, e.g. --bits {sweep[0]} 8")
        for name in ("weight_bits", "act_bits"):  # the PTQ recipe of the narrowest width
            args.setdefault(name, sweep[-1])
    elif bits is not None and len(bits) > 1:
        sweep, bits = list(bits), None
    if bits is not None:
        args["bits"] = bits[0]
    for shorthand, targets in (("bits", ("weight_bits", "act_bits")), ("scheme", ("weight_scheme", "act_scheme"))):
        value = args.pop(shorthand, None)
        if value is not None:
            for target in targets:
                args.setdefault(target, value)
    for value in sweep or []:  # before the config, whose width fields the sweep's narrowest value fills
        check_bits_flag(value, "bits")
    cfg = resolve_config(args, cls=QuantizeConfig)
    for name in observers or []:
        if name not in OBSERVER_NAMES:
            raise UserError(f"invalid observer '{name}'; choose from {', '.join(OBSERVER_NAMES)}")
    given = [name for name in QAT_ONLY if name in args]
    if given and cfg.mode != "qat":
        raise UserError(f"--{given[0].replace('_', '-')} is a QAT setting: add --mode qat")
    if (sweep or observers) and cfg.mode not in ("ptq", "compare"):
        raise UserError("--sweep / several --bits / --observers need --mode ptq or compare")
    if cfg.save_checkpoints and not (sweep or observers):
        raise UserError("--save-checkpoints is a setting of --sweep / several --bits / --observers (a single-width "
                        "run always keeps its checkpoint)")
    return QuantizeRequest(cfg, sweep, observers)


def is_sweep(sweep_bits: Sequence[int] | None, observers: Sequence[str] | None) -> bool:
    """Several PTQ points in one run (several widths or several observers)."""
    return bool(sweep_bits and len(sweep_bits) > 1) or bool(observers and len(observers) > 1)
