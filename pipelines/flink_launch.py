"""Where `tessera worker --engine flink` runs: here if PyFlink imports, else in the Flink venv.

PyFlink 2.0 caps numpy, pyarrow and protobuf below what the core venv uses, so the job
runs under a second interpreter (`.venv-flink`, built by `make flink-setup`). This module
imports no PyFlink: it only decides which interpreter runs the job.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

FLINK_VENV = ".venv-flink"


class FlinkUnavailable(RuntimeError):
    """Neither this interpreter nor a Flink venv can run the PyFlink job; says how to fix it."""


def flink_python(root: Path | None = None) -> Path | None:
    """The Flink venv's interpreter beside the project (None when it is not set up)."""
    root = root or Path(__file__).resolve().parents[1]
    python = root / FLINK_VENV / "bin" / "python"
    return python if python.exists() else None


def run_in_flink_python(argv: list[str], root: Path | None = None) -> None:
    """Return if PyFlink imports here; otherwise exec `argv` under the Flink venv's python.

    In: the command-line arguments after the program name. Raises FlinkUnavailable with
    the setup command when there is no Flink venv.
    """
    if importlib.util.find_spec("pyflink") is not None:
        return
    python = flink_python(root)
    if python is None:
        raise FlinkUnavailable(
            "the Flink engine needs PyFlink, which this interpreter lacks and no "
            f"{FLINK_VENV}/ was found.\nBuild it once with `make flink-setup` (about 2 minutes)."
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), "-m", "pipelines.cli", *argv])
