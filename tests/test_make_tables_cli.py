"""scripts/make_tables.py's command line: a report folder of other records is refused unless --overwrite, which
leaves none of the old report's files behind (its --help is checked in test_script_help.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "make_tables.py"
FIXTURES = ROOT / "tests" / "fixtures" / "eval"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_report_of_other_records_is_refused_unless_overwrite(tmp_path: Path) -> None:
    records = tmp_path / "records"
    shutil.copytree(FIXTURES, records)
    out = tmp_path / "report"
    first = run(str(records), "--out", str(out), "--no-plots")
    assert first.returncode == 0, first.stderr
    assert (out / "table4.md").is_file() and (out / "make_tables.json").is_file()
    (out / "README.md").write_text("kept\n")  # not make_tables' file: never touched
    again = run(str(records), "--out", str(out), "--no-plots")  # the same records: refreshing the report is fine
    assert again.returncode == 0, again.stderr

    for rec in records.glob("*.json"):  # other records: only Table 3 now, so table4.* would be stale
        if json.loads(rec.read_text()).get("row", {}).get("table") == 4:
            rec.unlink()
    before = {p.name: p.read_text() for p in out.iterdir()}
    refused = run(str(records), "--out", str(out), "--no-plots")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "not made from these records" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # nothing written

    replaced = run(str(records), "--out", str(out), "--no-plots", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    names = {p.name for p in out.iterdir()}
    assert "table3.md" in names and "table4.md" not in names and "table4.csv" not in names
    assert (out / "README.md").read_text() == "kept\n"
