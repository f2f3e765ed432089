"""Every example command in a script's --help runs as written: its options are ones the parser accepts and the
configs it names exist (make_tables.py advertised --logs/--title; evaluate.py named a config that does not exist)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT


def help_text(script: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("script", ["make_tables.py", "evaluate.py"])
def test_help_examples_use_accepted_options_and_existing_configs(script: str) -> None:
    text = help_text(script)
    usage = text.split("\n\n")[0]
    accepted = set(re.findall(r"--[a-z][\w-]*", usage)) | {"--help"}
    # the part of each example after the script's name (torchrun's own options come before it); continuation lines
    examples = [line.split(f"scripts/{script}", 1)[-1] for line in text.splitlines()
                if (f"scripts/{script}" in line or line.startswith("      --")) and not line.lstrip().startswith("#")]
    assert examples, f"{script} --help shows no example command"
    used = {opt for line in examples for opt in re.findall(r"(?<![\w-])--[a-z][\w-]*", line)}
    assert used and used <= accepted, f"{script} --help examples use options it rejects: {sorted(used - accepted)}"
    configs = {c for line in examples for c in re.findall(r"configs/[\w./-]+\.yaml", line)}
    assert all((ROOT / c).is_file() for c in configs), f"{script} --help names missing configs: {sorted(configs)}"
