"""Running a `pipelines/` recipe as a user would: its shell script, in a work folder, with the
test interpreter's `tilefcn` first on PATH and a small generated input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def run_recipe(name: str, work: Path, size: int = 512) -> list[str]:
    """Run ``pipelines/<name>/run.sh`` in ``work`` on a generated ``size``² input (2 workers,
    128-px tiles, time-bounded); assert it succeeded and return its stdout lines."""
    env = {**os.environ, "WORK": str(work), "SIZE": str(size),
           "TILEFCN_ARGS": "--tile 128 --workers 2 -q",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(PIPELINES / name / "run.sh")], env=env, cwd=work,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()
