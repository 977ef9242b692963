"""Engine jobs in a fresh process: vLLM starts processes of its own and holds memory until its process ends, so the
benchmark and the evaluation through the engine each run as ``python -m <module> job.json out.json``, the caller
(the app, a test) keeping none of their state."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_job(module: str, job: dict[str, Any], env: dict[str, str], what: str, timeout_s: float) -> Any:
    """Run ``module`` on ``job`` in a fresh Python (this environment plus ``env``); its JSON result. A failure
    raises ``RuntimeError`` with ``what`` failed and the root of the engine's output (:func:`error_excerpt`)."""
    with tempfile.TemporaryDirectory(prefix="nbl-job-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", module, str(spec), str(out)], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{error_excerpt(proc.stderr)}")
        return json.loads(out.read_text())


def job_main(run: Callable[[dict[str, Any]], Any], description: str) -> None:
    """The ``__main__`` of a job module: read the job's JSON, write ``run``'s result as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(json.loads(args.job.read_text())), indent=2))


def error_excerpt(output: str, head: int = 6000, tail: int = 2000) -> str:
    """What a failed engine's output says, kept short: from its first traceback (the root cause: vLLM's last lines
    only say that its engine core failed) and its last lines."""
    start = max(output.find("Traceback (most recent call last)"), 0)
    if len(output) - start <= head + tail:
        return output[start:]
    return f"{output[start : start + head]}\n[... {len(output) - start - head - tail} characters ...]\n{output[-tail:]}"
