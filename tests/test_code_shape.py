"""The shape of the code: short functions, a light and quiet import, configs checked before model code loads."""

import ast
import subprocess
import sys
from pathlib import Path

import nbl

PACKAGE = Path(nbl.__file__).resolve().parent
OPTIONAL = ("torchao", "peft", "lm_eval", "wandb", "submitit", "accelerate")


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_nbl_is_quiet_and_loads_nothing_heavy():
    proc = _fresh(
        "import sys, nbl\n"
        f"print(sorted(m for m in ('torch', 'transformers', *{OPTIONAL!r}) if m in sys.modules))\n"
        "nbl.calibrate, nbl.linearize, nbl.cca_bound, nbl.refit_propagated\n"  # the core API, touched
        f"print(sorted(m for m in ('transformers.modeling_utils', *{OPTIONAL!r}) if m in sys.modules))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[]"] and proc.stderr == ""


def test_a_config_is_checked_before_transformers_model_code_loads():
    proc = _fresh(
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from nbl.__main__ import CONF_DIR\n"
        "from nbl.recipe.validation import validate\n"
        "with initialize_config_dir(config_dir=CONF_DIR, version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['experiment=smoke', 'selection=plan'])\n"
        "validate(cfg)\n"
        f"print(sorted(m for m in ('transformers.modeling_utils', *{OPTIONAL!r}) if m in sys.modules))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
