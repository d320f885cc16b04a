"""Train an fp32 image classifier with PyTorch Lightning.

    python train.py                                    # ResNet-20 on the embedded digits set, CPU
    python train.py --data fashion-mnist --model resnet20 --epochs 15
    python train.py --accelerator cpu --devices 2 --strategy ddp
    python train.py --gpus 4 --opt-level O2
    python train.py --resume last

Flags override ``--config`` YAML presets (``configs/``), which override the built-in defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from lit_quant.app.cli import ArgumentParser, console, run_cli
from lit_quant.app.config import TrainConfig, add_config_arguments, load_yaml, resolve_config
from lit_quant.app.recipes import OWN_MODELS, train_recipe

if TYPE_CHECKING:
    from lit_quant.app.training import TrainResult


def build_parser() -> ArgumentParser:
    """The ``train.py`` argument parser: ``--config`` plus one flag per :class:`TrainConfig` field."""
    recipes = "\n".join(f"  {train_recipe(m).describe()}" for m in ("resnet20", "resnet18", "vit_b_16"))
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="--optimizer, --lr, --weight-decay, --warmup-epochs, --batch-size and --bn-momentum "
                                   "not given\n(here or in --config) come from the model family's recipe:\n" + recipes
                                   + f"\n(lit-quant's own models: {', '.join(OWN_MODELS)}; transformers: torchvision's "
                                     "vit_*, swin_*, maxvit_*;\nevery other torchvision classifier: the CNN recipe)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of defaults (flags given here override it)")
    add_config_arguments(parser, TrainConfig)
    return parser


def resolve_args(argv: Sequence[str] | None) -> tuple[TrainConfig, object]:
    """Parse ``argv`` into the resolved config and the checkpoint to resume from (or ``None``).

    With ``--resume``, the ``config.yaml`` saved beside that checkpoint supplies the defaults, so a resumed
    run continues with its own settings; ``--config`` and flags still override it.
    """
    args = vars(build_parser().parse_args(argv))
    args.pop("verbose", None)  # run_cli's
    from lit_quant.app.training import find_resume_checkpoint  # after parsing: --help needs no torch

    config_file = args.pop("config", None)
    yaml_defaults = load_yaml(config_file) if config_file else {}
    resume_path = None
    resume = args.get("resume", yaml_defaults.get("resume"))
    if resume:
        checkpoint_dir = args.get("checkpoint_dir", yaml_defaults.get("checkpoint_dir", TrainConfig.checkpoint_dir))
        run_name = args.get("run_name", yaml_defaults.get("run_name"))
        resume_path = find_resume_checkpoint(resume, checkpoint_dir, run_name)
        saved = resume_path.parent / "config.yaml"
        run_defaults = load_yaml(saved) if saved.is_file() else {}
        run_defaults.pop("resume", None)
        run_defaults["run_name"] = resume_path.parent.name
        yaml_defaults = {**run_defaults, **yaml_defaults}
    return resolve_config(args, yaml_defaults), resume_path


def summary_table(result: TrainResult) -> Table:
    """The rich summary printed at the end of a run."""
    m = result.metrics
    table = Table(title=f"lit-quant training: {result.run_dir.name}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in (("val/top1", "val top-1 (best ckpt)", "{:.2f} %"), ("val/top5", "val top-5", "{:.2f} %"),
                            ("test/top1", "test top-1", "{:.2f} %"), ("test/top5", "test top-5", "{:.2f} %"),
                            ("test/loss", "test loss", "{:.4f}"), ("epochs", "epochs", "{}"),
                            ("fit_time_s", "training time", "{:.1f} s"), ("precision", "precision", "{}"),
                            ("world_size", "processes", "{}")):
        if key in m:
            table.add_row(label, fmt.format(m[key]))
    if result.recipe:
        table.add_row("recipe", result.recipe)
    if result.resumed_from is not None:
        table.add_row("resumed from", str(result.resumed_from))
    for label, path in (("best checkpoint", result.best_ckpt), ("last checkpoint", result.last_ckpt),
                        ("config", result.config_path), ("metrics", result.metrics_path)):
        table.add_row(label, str(path))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, train, print the summary; returns the exit status."""
    cfg, resume_path = resolve_args(argv)
    from lit_quant.app.training import run_training  # after parsing: --help and flag errors need no torch

    result = run_training(cfg, resume_path)
    if result.is_global_zero:
        console.print(summary_table(result))
        skipped = result.metrics.get("skipped_images", 0)
        if skipped:
            console.print(f"skipped {skipped} unreadable image(s) of the data folder, each named in a warning above")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="train.py"))
