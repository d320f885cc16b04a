"""A hostile-input and fault pass over train.py, quantize.py and the library: every case runs as a user runs it
(a fresh process), and each ends in one of these outcomes, counted and printed at the end:

- ``ok``: refused with exit status 2 and one line on stderr before any work, nothing written (or, for a case
  that must succeed, exit 0 with its result in place);
- ``traceback``: a Python traceback reached the user;
- ``multi-line``: refused, but with more than one line;
- ``late``: refused only after the work had started (a Trainer's fit / validate / test / predict ran);
- ``wrote``: refused, but files were left in the folders the run was given;
- ``silent``: accepted input that should have been refused;
- ``lost``: a file the user had (or another run's result) was changed or removed;
- ``wrong-message``: refused in one line that does not name what is wrong;
- ``failed``: a case that must succeed did not.

Where the work starts is recorded by a ``sitecustomize`` hook that notes the first Trainer stage call in a
file (``LQ_WORK_MARK``), so "late" needs no timing.

Run:  python tools/hostile.py                 # every case (about 15 minutes on 2 cores)
      python tools/hostile.py --cases plan    # the cases whose name contains "plan"
      python tools/hostile.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: The work-start hook: patches ``pytorch_lightning.Trainer``'s stage methods when Lightning is imported.
HOOK = r'''
import os, sys, importlib.abc, importlib.util
_MARK = os.environ.get("LQ_WORK_MARK")

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pytorch_lightning.trainer.trainer":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        loader = spec.loader
        run = loader.exec_module
        def exec_module(module):
            run(module)
            for stage in ("fit", "validate", "test", "predict"):
                real = getattr(module.Trainer, stage)
                def marked(self, *a, _real=real, _stage=stage, **k):
                    with open(_MARK, "a") as fh:
                        fh.write(_stage + "\n")
                    return _real(self, *a, **k)
                setattr(module.Trainer, stage, marked)
        loader.exec_module = exec_module
        return spec

if _MARK:
    sys.meta_path.insert(0, _Finder())
'''


@dataclass
class Case:
    """One hostile input: what to run, how to set it up, and what must hold."""

    name: str
    script: str  # "train.py", "quantize.py" or "python" (a snippet in args[0])
    args: list[str]
    setup: Callable[[Path], None] | None = None
    expect: str = "refuse"  # "refuse": exit 2, one line, before work; "fault": the same during work; "ok": exit 0
    needle: str | None = None  # text the one line must hold
    watch: list[str] = field(default_factory=list)  # folders (relative to the workspace) nothing may be added to
    protect: list[str] = field(default_factory=list)  # files that must stay byte for byte
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None  # extra check: a problem or None
    timeout: float = 300


def snapshot(base: Path, folders: list[str]) -> set[str]:
    """Every path under ``folders`` (relative to ``base``), lock files and the kernel build cache left out."""
    seen: set[str] = set()
    for folder in folders:
        root = base / folder
        if root.exists():
            seen |= {str(p.relative_to(base)) for p in root.rglob("*") if p.name != ".lock"}
    return seen


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_case(case: Case, work: Path, hook_dir: Path) -> dict[str, Any]:
    """Run one case in a fresh copy of the workspace; its outcome and the one line it printed."""
    ws = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    shutil.copytree(work / "base", ws, dirs_exist_ok=True)
    if case.setup is not None:
        case.setup(ws)
    mark = ws / ".work-started"
    before = snapshot(ws, case.watch)
    protected = {p: digest(ws / p) for p in case.protect}
    env = {**os.environ, "PYTHONPATH": f"{hook_dir}{os.pathsep}{ROOT}", "LQ_WORK_MARK": str(mark),
           **{k: v.replace("{ws}", str(ws)) for k, v in case.env.items()}}
    args = [a.replace("{ws}", str(ws)) for a in case.args]
    command = [sys.executable, "-c", args[0]] if case.script == "python" else \
        [sys.executable, str(ROOT / case.script), *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, timeout=case.timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "outcome": "failed", "line": f"no answer in {case.timeout:.0f} s"}
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    outcome = "ok"
    if "Traceback (most recent call last)" in proc.stderr:
        outcome = "traceback"
    elif case.expect == "refuse":
        if proc.returncode == 0:
            outcome = "silent"
        elif proc.returncode != 2 or len(lines) != 1:
            outcome = "multi-line"
        elif mark.exists():
            outcome = "late"
        elif snapshot(ws, case.watch) - before:
            outcome = "wrote"
        elif case.needle and case.needle not in lines[0]:
            outcome = "wrong-message"
    elif case.expect == "fault":  # refused mid-work (a fault found there): one line, exit 2
        if proc.returncode != 2 or len(lines) != 1:
            outcome = "multi-line" if proc.returncode else "silent"
        elif case.needle and case.needle not in lines[0]:
            outcome = "wrong-message"
    elif proc.returncode != 0:
        outcome = "failed"
    if outcome == "ok" and any(digest(ws / p) != d for p, d in protected.items()):
        outcome = "lost"
    if outcome == "ok" and case.after is not None:
        problem = case.after(ws, proc)
        if problem:
            outcome = "failed" if case.expect == "ok" else "lost"
            lines = [problem]
    shutil.rmtree(ws, ignore_errors=True)
    return {"case": case.name, "outcome": outcome, "seconds": round(seconds, 1),
            "line": lines[-1] if lines else "", "lines": len(lines)}


# ---------------------------------------------------------------------------------------------- set-ups

TINY = ["--data", "fake", "--fake-size", "128", "--image-size", "8", "--model", "resnet20", "--epochs", "2",
        "--batch-size", "32", "--no-progress"]
CK = "{ws}/ck"
RUN = "{ws}/ck/tiny"
BEST = "{ws}/ck/tiny/best.ckpt"
Q = ["--checkpoint-dir", CK, "--calib-batches", "1", "--no-latency", "--no-progress"]


def write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    """A set-up writing ``data`` to ``<workspace>/<rel>`` (in place of a folder there)."""
    def setup(ws: Path) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def edit_checkpoint(change: Callable[[dict[str, Any]], Any], rel: str = "ck/tiny/best.ckpt",
                    out: str | None = None) -> Callable[[Path], None]:
    """A set-up loading the run's checkpoint, applying ``change`` to it and saving it (to ``out``)."""
    def setup(ws: Path) -> None:
        import torch

        ckpt = torch.load(ws / rel, weights_only=True)
        result = change(ckpt)
        torch.save(ckpt if result is None else result, ws / (out or rel))
    return setup


def hparams(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(ckpt: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DROP:
                ckpt["hyper_parameters"].pop(key, None)
            else:
                ckpt["hyper_parameters"][key] = value
    return change


def arch(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(ckpt: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DROP:
                ckpt["hyper_parameters"]["arch"].pop(key, None)
            else:
                ckpt["hyper_parameters"]["arch"][key] = value
    return change


DROP = object()


def set_tensor(suffix: str, value: float) -> Callable[[dict[str, Any]], None]:
    def change(ckpt: dict[str, Any]) -> None:
        name = next(k for k in ckpt["state_dict"] if k.endswith(suffix))
        ckpt["state_dict"][name].view(-1)[0] = value
    return change


class _Evil:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def pickle_with_code(rel: str) -> Callable[[Path], None]:
    """A torch checkpoint that runs ``os.system`` when loaded without restrictions (``weights_only=False``)."""
    def setup(ws: Path) -> None:
        import torch

        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": _Evil(f"touch {ws}/pwned")}, ws / rel)
    return setup


def not_pwned(ws: Path, _proc: subprocess.CompletedProcess) -> str | None:
    return "the file's code ran" if (ws / "pwned").exists() else None


def stats_file(minimum: float, maximum: float) -> Callable[[Path], None]:
    """A stats file of the run's model and plan with every range set to ``[minimum, maximum]``."""
    def setup(ws: Path) -> None:
        import yaml

        text = (ws / "stats.yaml").read_text()
        data = yaml.safe_load(text)
        for entry in data["quantizers"].values():
            entry["min"] = [minimum] * len(entry["min"])
            entry["max"] = [maximum] * len(entry["max"])
        (ws / "stats.yaml").write_text(yaml.safe_dump(data))
    return setup


def imagenet(bad: str | None) -> Callable[[Path], None]:
    """An ImageFolder tree of 2 classes x 6 PNGs (train and val), one file made bad: ``truncated``, ``bomb`` (a
    decompression bomb), ``pickle`` (a pickle named .png)."""
    def setup(ws: Path) -> None:
        import io
        import pickle

        from PIL import Image

        for split in ("train", "val"):
            for label in ("a", "b"):
                folder = ws / "imagenet" / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(6):
                    Image.new("RGB", (40, 40), (i * 30, 80 if label == "a" else 160, 0)).save(folder / f"{i}.png")
        victim = ws / "imagenet" / "train" / "a" / "3.png"
        if bad == "truncated":
            victim.write_bytes(victim.read_bytes()[:60])
        elif bad == "bomb":
            buffer = io.BytesIO()
            Image.new("1", (40000, 40000)).save(buffer, "PNG")
            victim.write_bytes(buffer.getvalue())
        elif bad == "pickle":
            victim.write_bytes(pickle.dumps({"not": "an image"}))
    return setup


def locked_temp_file(ws: Path) -> None:
    """A save another live process is making: our temporary file, locked by a child process that outlives
    the case (it exits when the workspace goes)."""
    temp = ws / "ck" / "tiny" / ".last.ckpt.live.lit-quant.tmp"
    temp.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    _lock_in_child(ws, temp, "rb")


def _lock_in_child(ws: Path, path: Path, mode: str) -> None:
    """Lock ``path`` (opened with ``mode``) in a child process that holds it as long as the workspace exists;
    returns once the lock is held."""
    subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time, os\n"
                      f"fh = open({str(path)!r}, {mode!r}); fcntl.flock(fh.fileno(), fcntl.LOCK_EX)\n"
                      "open(sys.argv[1], 'w').close()\n"
                      f"while os.path.exists({str(ws)!r}): time.sleep(0.2)\n", str(ws / ".held")])
    while not (ws / ".held").exists():
        time.sleep(0.05)


def cases() -> list[Case]:
    """Every case, grouped: flags, config and plan files, checkpoints, data, outputs and faults, library."""
    T, QZ = "train.py", "quantize.py"
    tiny = [*TINY, "--checkpoint-dir", "{ws}/new"]
    out: list[Case] = []

    def refuse(name: str, script: str, args: list[str], needle: str | None = None, **kw: Any) -> None:
        watch = kw.pop("watch", ["new"] if script == T else ["ck"])
        out.append(Case(name, script, args, needle=needle, watch=watch, **kw))

    # --- train.py flags: refused before any work, nothing written
    for flag, value, needle in (
            ("--momentum", "-1", "--momentum"), ("--weight-decay", "-1", "--weight-decay"),
            ("--label-smoothing", "2", "--label-smoothing"), ("--label-smoothing", "-0.1", "--label-smoothing"),
            ("--seed", "-1", "--seed"), ("--batch-size", "99999999999999999999", "--batch-size"),
            ("--batch-size", "0", "--batch-size"), ("--epochs", "0", "--epochs"), ("--epochs", "-3", "--epochs"),
            ("--lr", "0", "--lr"), ("--lr", "-1", "--lr"), ("--lr", "inf", "finite"), ("--lr", "nan", "finite"),
            ("--val-fraction", "1.5", "--val-fraction"), ("--val-fraction", "0", "--val-fraction"),
            ("--image-size", "0", "--image-size"), ("--warmup-epochs", "20", "--warmup-epochs"),
            ("--bn-momentum", "2", "--bn-momentum"), ("--num-workers", "-1", "--num-workers"),
            ("--precision", "transformer-engine", "transformer"), ("--limit-train-batches", "0", "limit"),
            ("--log-every-n-steps", "0", "--log-every-n-steps"), ("--fake-size", "0", "--fake-size"),
            ("--devices", "0", "--devices"), ("--gpus", "2", "CUDA"), ("--accelerator", "gpu", "CUDA"),
            ("--model", "resnet9000", "unknown model"), ("--optimizer", "rmsprop", "--optimizer"),
            ("--run-name", "../../escape", "--run-name"), ("--run-name", "/tmp/abs-escape", "--run-name"),
            ("--run-name", "", "--run-name"), ("--scheduler", "onecycle", "warm")):
        extra = ["--warmup-epochs", "1"] if (flag, value) == ("--scheduler", "onecycle") else []
        refuse(f"train {flag} {value or repr(value)}", T, [*tiny, flag, value, *extra], needle,
               watch=["new", "tmp-escape"])
    refuse("train --opt-level with --precision", T, [*tiny, "--opt-level", "O2", "--precision", "32"], "opt-level")
    refuse("train --data imagenet without files", T, [*tiny, "--data", "imagenet", "--data-dir", "{ws}/none"],
           "imagenet")
    refuse("train --data mnist --data-dir a file", T, [*tiny, "--data", "mnist", "--data-dir", "{ws}/file"],
           setup=write("file", "x"))
    # --- train.py config files
    refuse("train --config missing", T, [*tiny, "--config", "{ws}/none.yaml"], "not found")
    refuse("train --config YAML syntax error", T, [*tiny, "--config", "{ws}/c.yaml"], "at line",
           setup=write("c.yaml", "epochs: 3\nlr: [0.1\n"))
    refuse("train --config /dev/zero", T, [*tiny, "--config", "/dev/zero"], "not a regular file")
    refuse("train --config a folder", T, [*tiny, "--config", "{ws}/ck"], "ck")
    refuse("train --config binary", T, [*tiny, "--config", "{ws}/c.yaml"], "c.yaml",
           setup=write("c.yaml", bytes(range(256)) * 8))
    refuse("train --config unknown key", T, [*tiny, "--config", "{ws}/c.yaml"], "unknown config key",
           setup=write("c.yaml", "epochz: 3\n"))
    # --- train.py resume
    refuse("train --resume last without runs", T, [*tiny, "--resume", "last"], "last")
    refuse("train --resume a QAT checkpoint", T, [*TINY, "--checkpoint-dir", CK, "--resume",
                                                 "{ws}/ck/tiny/qat-w8a8/last.ckpt"], "QAT", watch=["ck"])
    refuse("train --resume random bytes", T, [*tiny, "--resume", "{ws}/r.ckpt"], "r.ckpt",
           setup=write("r.ckpt", os.urandom(3000)))
    refuse("train --resume code in a pickle", T, [*tiny, "--resume", "{ws}/evil.ckpt"], "evil.ckpt",
           setup=pickle_with_code("evil.ckpt"), after=not_pwned)
    refuse("train --resume bad RNG state", T, [*TINY, "--checkpoint-dir", CK, "--run-name", "tiny", "--resume",
                                              "last", "--epochs", "3"], "rng",
           setup=edit_checkpoint(lambda c: c.update(rng_state={"python": "garbage"}), "ck/tiny/last.ckpt"),
           watch=["ck"], protect=["ck/tiny/best.ckpt"])
    refuse("train --num-nodes 2 on one machine", T, [*tiny, "--num-nodes", "2"], "MASTER_ADDR",
           env={"LIT_QUANT_NODE_TIMEOUT": "20"}, timeout=120)
    # --- quantize.py flags
    for flag, value, needle in (
            ("--bits", "1", "2..16"), ("--bits", "17", "2..16"), ("--weight-bits", "0", "2..16"),
            ("--percentile", "200", "--percentile"), ("--percentile", "50", "--percentile"),
            ("--n-std", "-1", "--n-std"), ("--calib-batches", "0", "--calib-batches"),
            ("--batch-size", "0", "--batch-size"), ("--batch-size", "99999999999999999999", "--batch-size"),
            ("--adaround-iters", "0", "--adaround-iters"), ("--adaround-lr", "-1", "--adaround-lr"),
            ("--max-drop", "-1", "--max-drop"), ("--backend", "tpu", "--backend"),
            ("--name", "../x", "--name"), ("--name", "a/b", "--name"), ("--explain", "nope", "nope"),
            ("--io-bits", "1", "2..16"), ("--onnx-opset", "5", "opset"), ("--devices", "0", "--devices")):
        extra = ["--export", "onnx"] if flag == "--onnx-opset" else []
        refuse(f"quantize {flag} {value}", QZ, [*Q, flag, value, *extra], needle)
    for flags, needle in (
            (["--mode", "qat", "--seed", "-1"], "--seed"), (["--mode", "qat", "--lr", "-1"], "--lr"),
            (["--mode", "qat", "--epochs", "0"], "--epochs"), (["--mode", "qat", "--distill", "--distill-weight",
                                                                  "2"], "--distill-weight"),
            (["--mode", "qat", "--bits", "4", "--resume", "last"], "last.ckpt"), (["--resume", "last"], "--mode qat"),
            (["--sensitivity", "--mode", "qat"], "--sensitivity"), (["--mode", "builtin", "--export", "int8"],
                                                                    "--export"),
            (["--mode", "qat", "--precision", "transformer-engine"], "transformer"),
            (["--mode", "qat", "--freeze-bn-epoch", "-1"], "--freeze-bn-epoch"),
            (["--num-nodes", "2"], "MASTER_ADDR")):
        refuse(f"quantize {' '.join(flags)}", QZ, [*Q, *flags], needle, env={"LIT_QUANT_NODE_TIMEOUT": "20"},
               timeout=120)
    # --- plans
    for name, text, needle in (
            ("YAML syntax error", "weight: {bits: 4\nact: 8\n", "line"),
            ("unknown layer", "overrides:\n  - {pattern: layerz.3.conv1, weight: {bits: 4}}\n", "layerz.3.conv1"),
            ("observer option out of range", "act: {observer: percentile, observer_args: {percentile: 200}}\n",
             "percentile"),
            ("unknown observer option", "act: {observer: minmax, observer_args: {bins: 3}}\n", "bins"),
            ("bits 20", "weight: {bits: 20}\n", "2..16"), ("overrides not a list", "overrides: 3\n", "overrides"),
            ("binary", "\x00\x01\x02\xff" * 100, "plan"), ("a list", "- 1\n- 2\n", "mapping"),
            ("boolean string", 'fold_bn: "no"\n', "fold_bn")):
        refuse(f"quantize --plan {name}", QZ, [*Q, "--plan", "{ws}/plan.yaml"], needle,
               setup=write("plan.yaml", text))
    refuse("quantize --plan /dev/zero", QZ, [*Q, "--plan", "/dev/zero"], "not a regular file")
    refuse("quantize --plan missing", QZ, [*Q, "--plan", "{ws}/none.yaml"], "none.yaml")
    refuse("quantize --plan a folder", QZ, [*Q, "--plan", "{ws}/ck"], "ck")
    refuse("quantize --no-quant-layers unknown", QZ, [*Q, "--no-quant-layers", "layerz.9"], "layerz.9")
    # --- stats files
    refuse("quantize --stats-file ranges beyond float32", QZ, [*Q, "--stats-file", "{ws}/stats.yaml"], "stats",
           setup=stats_file(-1e39, 1e39), protect=["stats.yaml"])
    refuse("quantize --stats-file every range [0, 0]", QZ, [*Q, "--stats-file", "{ws}/stats.yaml"], "stats",
           setup=stats_file(0.0, 0.0), protect=["stats.yaml"])
    refuse("quantize --stats-file YAML syntax error", QZ, [*Q, "--stats-file", "{ws}/s.yaml"], "line",
           setup=write("s.yaml", "version: 1\nquantizers: {input: [\n"))
    refuse("quantize --stats-file binary", QZ, [*Q, "--stats-file", "{ws}/s.yaml"], "s.yaml",
           setup=write("s.yaml", bytes(range(256)) * 8))
    refuse("quantize --stats-file a folder", QZ, [*Q, "--stats-file", "{ws}/ck"], "folder")
    refuse("quantize --stats-file unwritable", QZ, [*Q, "--stats-file", "/proc/lq/stats.yaml"], "stats-file")
    # --- checkpoints given to quantize.py
    for name, setup, needle in (
            ("missing", None, "not found"),
            ("a folder", lambda ws: (ws / "x.ckpt").mkdir(), "x.ckpt"),
            ("random bytes", write("x.ckpt", os.urandom(5000)), "x.ckpt"),
            ("code in a pickle", pickle_with_code("x.ckpt"), "x.ckpt"),
            ("without arch", edit_checkpoint(hparams(arch=DROP), out="x.ckpt"), "arch"),
            ("arch without in_channels", edit_checkpoint(arch(in_channels=DROP), out="x.ckpt"), "in_channels"),
            ("negative class count", edit_checkpoint(arch(num_classes=-3), out="x.ckpt"), "num_classes"),
            ("unknown model", edit_checkpoint(arch(model="resnet9000"), out="x.ckpt"), "resnet9000"),
            ("extra hyper-parameter", edit_checkpoint(hparams(colour="blue"), out="x.ckpt"), "colour"),
            ("missing hyper-parameter", edit_checkpoint(hparams(lr=DROP), out="x.ckpt"), "lr"),
            ("string learning rate", edit_checkpoint(hparams(lr="fast"), out="x.ckpt"), "lr"),
            ("inf in a BatchNorm variance", edit_checkpoint(set_tensor("bn1.running_var", float("inf")),
                                                            out="x.ckpt"), "running_var"),
            ("NaN weight", edit_checkpoint(set_tensor("conv1.weight", float("nan")), out="x.ckpt"), "conv1"),
            ("huge architecture", edit_checkpoint(lambda c: {"state_dict": {}, "hyper_parameters": {
                **c["hyper_parameters"], "num_classes": 10 ** 7, "arch": {
                    **c["hyper_parameters"]["arch"], "model": "vit_h_14", "num_classes": 10 ** 7,
                    "image_size": 224}}}, out="x.ckpt"),
             "does not match its architecture"),
            ("a quantized checkpoint", edit_checkpoint(lambda c: None, "ck/tiny/ptq-w8a8.ckpt", "x.ckpt"),
             "--eval")):
        refuse(f"quantize --ckpt {name}", QZ, [*Q, "--ckpt", "{ws}/x.ckpt"], needle, setup=setup,
               after=not_pwned, timeout=120)
    for name, setup, needle in (
            ("missing", None, "not found"),
            ("an fp32 checkpoint", None, "fp32"),
            ("unknown data key", edit_checkpoint(lambda c: c["data"].update(colour="blue"), "ck/tiny/ptq-w8a8.ckpt",
                                                 "x.ckpt"), "colour"),
            ("without a plan", edit_checkpoint(lambda c: c.pop("plan") and None, "ck/tiny/ptq-w8a8.ckpt", "x.ckpt"),
             "plan"),
            ("random bytes", write("x.ckpt", os.urandom(5000)), "x.ckpt")):
        target = "{ws}/ck/tiny/best.ckpt" if name == "an fp32 checkpoint" else "{ws}/x.ckpt"
        refuse(f"quantize --eval {name}", QZ, ["--eval", target, "--no-progress"], needle, setup=setup)
    refuse("quantize on a run whose config.yaml is broken", QZ, Q, "config.yaml",
           setup=write("ck/tiny/config.yaml", "data: [unclosed\n"))
    out += output_cases() + data_cases() + library_cases()
    return out


def output_cases() -> list[Case]:
    """Output folders, concurrent runs, kills, full disks and divergence."""
    T, QZ = "train.py", "quantize.py"
    two_runs = (  # two quantize runs of one checkpoint at once: both keep their reports and checkpoints
        "import subprocess, sys, json, pathlib\n"
        f"cmd = [sys.executable, {str(ROOT / 'quantize.py')!r}, '--checkpoint-dir', 'ck', '--calib-batches', '1', "
        "'--no-latency', '--no-progress']\n"
        "before = set(pathlib.Path('ck/tiny/quantize').iterdir())\n"
        "procs = [subprocess.Popen(cmd + ['--bits', b]) for b in ('8', '6')]\n"
        "assert all(p.wait() == 0 for p in procs)\n"
        "new = set(pathlib.Path('ck/tiny/quantize').iterdir()) - before\n"
        "widths = sorted(json.loads((p / 'report.json').read_text())['rows'][1]['weight_bits'] for p in new)\n"
        "assert widths == [6, 8], widths\n"
        "assert all(any(p.glob('ptq-w*a*.ckpt')) for p in new)\n")
    kill_and_resume = (  # SIGKILL a training run after its first checkpoint, then resume it to the end
        "import subprocess, sys, time, os, signal, pathlib\n"
        f"cmd = [sys.executable, {str(ROOT / 'train.py')!r}, {', '.join(repr(a) for a in TINY)}, '--epochs', '4', "
        "'--checkpoint-dir', 'k', '--run-name', 'r']\n"
        "p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "while not pathlib.Path('k/r/last.ckpt').exists() and p.poll() is None: time.sleep(0.05)\n"
        "os.kill(p.pid, signal.SIGKILL); p.wait()\n"
        "assert subprocess.run(cmd + ['--resume', 'last']).returncode == 0\n"
        "import torch; assert torch.load('k/r/last.ckpt', weights_only=True)['epoch'] == 3\n")
    return [
        Case("quantize when <run>/quantize is a file", QZ, Q, needle="quantize", watch=["ck/tiny/quantize-x"],
             setup=write("ck/tiny/quantize", "a file where the report folders go")),
        Case("quantize --name of a folder another run holds", QZ, [*Q, "--name", "busy"], needle="in use",
             setup=lambda ws: _hold_lock(ws, ws / "ck" / "tiny" / "quantize" / "busy"),
             protect=["ck/tiny/quantize/busy/report.json"]),
        Case("quantize keeps a user's hidden .tmp beside --stats-file", QZ, [*Q, "--stats-file",
                                                                           "{ws}/shared/stats.yaml"],
             expect="ok", setup=write("shared/.thesis.tmp", "draft"), protect=["shared/.thesis.tmp"]),
        Case("quantize while another run saves in that folder", QZ, Q, expect="ok", setup=locked_temp_file,
             after=lambda ws, _: None if (ws / "ck/tiny/.last.ckpt.live.lit-quant.tmp").exists()
             else "the other run's save in progress was removed"),
        Case("two quantize runs of one checkpoint at once", "python", [two_runs], expect="ok"),
        Case("train killed mid-run resumes to the end", "python", [kill_and_resume], expect="ok"),
        Case("train that diverges stops and keeps the last finite model", T,
             [*TINY, "--checkpoint-dir", CK, "--run-name", "tiny", "--lr", "1e12"], expect="fault",
             needle="non-finite", protect=["ck/tiny/best.ckpt"]),
        Case("QAT that diverges stops with one line", QZ, [*Q, "--mode", "qat", "--bits", "8", "--epochs", "1",
                                                        "--lr", "1e38", "--no-builtin-qat"],
             expect="fault", needle="non-finite"),
        Case("quantize of an fp32 model that overflows", QZ, [*Q, "--ckpt", "{ws}/x.ckpt"], expect="fault",
             needle="fp32 model", setup=edit_checkpoint(overflowing_weights, out="x.ckpt")),
        Case("train onto a full disk", T, [*TINY, "--epochs", "3", "--checkpoint-dir", "{ws}/small"],
             expect="fault", needle="disk is full", setup=_tmpfs("small", "1500k")),
        Case("quantize into a read-only run folder", QZ, [*Q, "--checkpoint-dir", "{ws}/ro"], needle="read-only",
             setup=_read_only_copy),
    ]


def _hold_lock(ws: Path, folder: Path) -> None:
    """Another live run holding ``folder``'s lock (a child process that lives as long as the workspace)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text("the other run's report")
    _lock_in_child(ws, folder / ".lock", "w")


def overflowing_weights(ckpt: dict[str, Any]) -> None:
    """Weights whose products overflow float32 in the forward pass."""
    for name, tensor in ckpt["state_dict"].items():
        if name.endswith("conv1.weight") or name.endswith("conv2.weight"):
            tensor.mul_(1e12)


def _tmpfs(rel: str, size: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / rel).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ws / rel)], check=True)
    return setup


def _read_only_copy(ws: Path) -> None:
    (ws / "ro").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ws / "ro")], check=True)
    shutil.copytree(ws / "ck" / "tiny", ws / "ro" / "tiny", ignore=shutil.ignore_patterns("qat-*", "quantize"))
    subprocess.run(["mount", "-o", "remount,ro", str(ws / "ro")], check=True)


def data_cases() -> list[Case]:
    """An ImageNet-style folder with one bad file: skipped and counted, named in the run's summary."""
    args = ["--data", "imagenet", "--data-dir", "{ws}/imagenet", "--model", "resnet20", "--image-size", "16",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--checkpoint-dir", "{ws}/new"]

    def skipped(ws: Path, proc: subprocess.CompletedProcess) -> str | None:
        return None if "skipped 1 unreadable image" in proc.stdout + proc.stderr else "the bad file was not reported"

    return [Case(f"train on an ImageNet folder with a {bad} file", "train.py", args, expect="ok",
                 setup=imagenet(bad), after=skipped) for bad in ("truncated", "bomb", "pickle")]


def library_cases() -> list[Case]:
    """The library's own errors: each a :class:`lit_quant.quant.QuantError` (or the exporters' error) with a
    one-line message, never another exception."""
    head = ("import sys, torch\nfrom torch import nn\nfrom lit_quant.quant import *\n"
            "from lit_quant.quant.errors import QuantError\nfrom lit_quant.deploy.graph import ExportError\n"
            "net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()\n"
            "try:\n")
    tail = "\nexcept (QuantError, ExportError) as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(2)\n"
    snippets = {
        "1-bit weights": "    QuantPlan.from_bits(weight_bits=1)",
        "unknown observer": "    QuantSpec(observer='nope')",
        "empty calibration": "    calibrate(prepare(net, QuantPlan.from_bits(8, 8)), [])",
        "override of no layer": "    prepare(net, QuantPlan.from_dict({'overrides': [{'pattern': 'fc9', 'skip': True}]}))",
        "untraceable model": ("    class M(nn.Module):\n        def forward(self, x):\n"
                              "            return x if x.sum() > 0 else -x\n    prepare(M(), QuantPlan())"),
        "stats of another model": ("    q = prepare(net, QuantPlan.from_bits(8, 8)); calibrate(q, [torch.rand(2, 1, 8, 8)])\n"
                                   "    other = prepare(nn.Sequential(nn.Conv2d(1, 2, 3)), QuantPlan.from_bits(8, 8))\n"
                                   "    import tempfile, pathlib; p = pathlib.Path(tempfile.mkdtemp()) / 's.yaml'\n"
                                   "    p.write_text(dump_stats(q)); load_stats(other, p)"),
        "qparams before calibration": ("    q = prepare(net, QuantPlan.from_bits(8, 8)); enable_observer(q, False)\n"
                                       "    enable_fake_quant(q); q(torch.rand(1, 1, 8, 8))"),
        "export of a float layer": ("    from lit_quant.deploy.onnx_export import export_onnx\n"
                                    "    q = prepare(net, QuantPlan.from_bits(8, 8, skip=['3'])); calibrate(q, [torch.rand(2, 1, 8, 8)])\n"
                                    "    export_onnx(q, 'x.onnx', torch.rand(1, 1, 8, 8))"),
        "QAT callback freeze epoch -1": "    from lit_quant import QATCallback\n    QATCallback(QuantPlan(), freeze_bn_epoch=-1)",
        "plan YAML syntax error": ("    import pathlib; pathlib.Path('p.yaml').write_text('weight: {bits: 4\\n')\n"
                                   "    QuantPlan.from_yaml('p.yaml')"),
    }
    return [Case(f"library: {name}", "python", [head + body + tail]) for name, body in snippets.items()]


# ---------------------------------------------------------------------------------------------- the pass


def build_base(work: Path) -> None:
    """The workspace every case starts from: a trained tiny run ``ck/tiny`` with a PTQ result, its stats
    file and a 1-epoch QAT run."""
    base = work / "base"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = [[str(ROOT / "train.py"), *TINY, "--checkpoint-dir", "ck", "--run-name", "tiny"],
             [str(ROOT / "quantize.py"), "--checkpoint-dir", "ck", "--calib-batches", "1", "--no-latency",
              "--no-progress", "--stats-file", "stats.yaml"],
             [str(ROOT / "quantize.py"), "--checkpoint-dir", "ck", "--calib-batches", "1", "--no-latency",
              "--no-progress", "--mode", "qat", "--bits", "8", "--epochs", "1", "--no-builtin-qat"]]
    base.mkdir(parents=True)
    for step in steps:
        subprocess.run([sys.executable, *step], cwd=base, env=env, check=True, capture_output=True)


def unmount_all(work: Path) -> None:
    """Unmount the tmpfs file systems the cases mounted under ``work``."""
    with open("/proc/mounts") as fh:
        points = [line.split()[1] for line in fh if line.split()[1].startswith(str(work))]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="run only the cases whose name contains this text")
    parser.add_argument("--json", metavar="PATH", help="also write every case's outcome to PATH")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    selected = [c for c in cases() if args.cases is None or args.cases in c.name]
    if args.list:
        print("\n".join(c.name for c in selected))
        return 0
    work = Path(tempfile.mkdtemp(prefix="lit-quant-hostile-"))
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    results = []
    try:
        build_base(work)
        for i, case in enumerate(selected, 1):
            result = run_case(case, work, hook_dir)
            results.append(result)
            unmount_all(work / "case-")
            print(f"[{i}/{len(selected)}] {result['outcome']:<13} {case.name}: {result['line'][:150]}", flush=True)
    finally:
        unmount_all(work)
        shutil.rmtree(work, ignore_errors=True)
    counts = Counter(r["outcome"] for r in results)
    print(f"\n{len(results)} cases: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in OUTCOMES))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {k: counts.get(k, 0) for k in OUTCOMES},
                                               "cases": results}, indent=1) + "\n")
    return 0 if counts.get("ok", 0) == len(results) else 1


OUTCOMES = ("ok", "traceback", "multi-line", "late", "wrote", "silent", "lost", "wrong-message", "failed")


if __name__ == "__main__":
    sys.exit(main())
