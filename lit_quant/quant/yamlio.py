"""Reading a YAML file a user names (a plan, a stats file, a config preset): one definition of what is refused.

Torch-free (PyYAML and the standard library), so the command-line parsers read presets through it without
loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lit_quant.quant.errors import QuantConfigError

#: The largest YAML file read (bytes): a plan, stats or config file is kilobytes; more is not one of them.
MAX_YAML_BYTES = 16 * 1024 * 1024


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of ``path`` (a ``what`` file: "plan", "stats", "config").

    Raises :class:`QuantConfigError` with one line naming the file when it is missing, not a regular file
    (a folder, ``/dev/zero``, a pipe), larger than :data:`MAX_YAML_BYTES`, not UTF-8 text, or not valid
    YAML (with the line and column of the error).
    """
    path = Path(path)
    if not path.exists():
        raise QuantConfigError(f"{what} file {path} not found")
    if path.is_dir():
        raise QuantConfigError(f"{what} file {path} is a folder, not a file")
    if not path.is_file():
        raise QuantConfigError(f"{what} file {path} is not a regular file (a device or a pipe?)")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise QuantConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise QuantConfigError(f"{what} file {path} is larger than {MAX_YAML_BYTES // 2**20} MiB: not a {what} file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise QuantConfigError(f"{what} file {path} is not text (a binary file?)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise QuantConfigError(f"{what} file {path} is not valid YAML{line} ({path}{where}): {problem}") from None
