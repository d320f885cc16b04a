"""The repository speaks to users: the flag reference is current, and no development-process words appear."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import gen_cli_docs

#: Words about how the project was built, not about what it does: work-item and work-period numbers, and
#: narration of runs. onnxruntime's ``InferenceSession`` / ``SessionOptions`` / ``session.run`` are its API,
#: not narration, and are matched by neither pattern.
FORBIDDEN = [
    re.compile(r"\bstops? \d+", re.IGNORECASE),
    re.compile(r"\bsince stop\b", re.IGNORECASE),
    re.compile(r"\bissues? #?\d+", re.IGNORECASE),
    re.compile(r"\b(this|that|each|every|one|two|an?|earlier|later|next|previous|last|the) sessions?\b",
               re.IGNORECASE),
    re.compile(r"\bsessions? (ago|before|later)\b", re.IGNORECASE),
    re.compile(r"\bat the start of this\b", re.IGNORECASE),
    # the documents the project grew from
    re.compile(r"\bseeds? \d{3}\b", re.IGNORECASE),
    re.compile(r"\bthe seed'?s\b(?! (value|rng|generator))", re.IGNORECASE),
    re.compile(r"\bseed (documents?|provenance)\b", re.IGNORECASE),
]

#: Where the word list itself has to be written down.
EXEMPT = {"tests/test_docs.py"}


def test_cli_reference_is_current() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == gen_cli_docs.render(), \
        "docs/cli.md is stale: run python tools/gen_cli_docs.py"


def test_cli_reference_lists_every_flag_with_its_allowed_values() -> None:
    import quantize
    import train

    text = gen_cli_docs.render()
    flags = [a.option_strings[0] for parser in (train.build_parser(), quantize.build_parser())
             for a in parser._actions if a.option_strings and a.dest != "help"]
    missing = [f for f in flags if f"`{f}" not in text]
    assert not missing, f"docs/cli.md does not document {missing}"
    mode_row = next(line for line in text.splitlines() if line.startswith("| `--mode`"))
    assert "`ptq`" in mode_row and "`qat`" in mode_row


def test_no_development_process_words_in_the_repository() -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if name in EXEMPT or not path.is_file() or path.suffix in (".png", ".ckpt", ".pt", ".onnx", ".gz"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{name}:{number}: {line.strip()[:100]}" for pattern in FORBIDDEN if pattern.search(line)]
        hits += [f"{name}: file name" for pattern in FORBIDDEN if pattern.search(name)]
    assert not hits, "development-process words:\n" + "\n".join(hits[:40])


def _snippet(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_lightning_example_runs_as_written(tmp_path, monkeypatch) -> None:
    """The README's own-project example, executed verbatim: PTQ then QAT in a user's LightningModule."""
    monkeypatch.chdir(tmp_path)  # Lightning writes nothing here (logger=False), but keep the repository clean
    namespace: dict = {}
    exec(compile(_snippet("## Use in your own Lightning project"), "README.md", "exec"), namespace)  # noqa: S102
    trainer, net = namespace["trainer"], namespace["net"]
    assert trainer.state.finished and trainer.current_epoch == 2
    from lit_quant.quant import QuantizedModel, iter_quantizers

    assert isinstance(net.net, QuantizedModel)  # the network at self.net, found and prepared by the callback
    quantizers = dict(iter_quantizers(net))
    assert quantizers and all(bool(fq.qparams_valid) for fq in quantizers.values())
    assert {fq.spec.bits for fq in quantizers.values()} == {4}
    assert (tmp_path / "net.onnx").stat().st_size > 0 and namespace["program"] == Path("net.pt2")
    import torch
    import torchao  # noqa: F401  (registers the program's quantize / dequantize ops)

    from lit_quant.deploy.onnx_export import run_onnx

    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    program, onnx_logits = torch.export.load(tmp_path / "net.pt2").module()(x), run_onnx(tmp_path / "net.onnx", x)
    # the same PTQ network in two runtimes: one prediction at most moved by a rounding tie
    assert (program.argmax(1) != onnx_logits.argmax(1)).sum() <= 1
    assert (program - onnx_logits).abs().max() < 0.05 * (onnx_logits.max() - onnx_logits.min())
