"""Every relative link and image in the project's Markdown points at a file that exists (reports move figures)."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _markdown() -> list[Path]:
    skip = {"third_party", ".git", "outputs", "logs", ".ci-venv", ".venv"}
    return [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)]


def broken_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks are not links
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (md.parent / target.split("#", 1)[0]).exists():
            out.append(f"{md.relative_to(ROOT)}: {target}")
    return out


def test_relative_links_resolve() -> None:
    broken = [b for md in _markdown() for b in broken_links(md)]
    assert broken == [], "broken links:\n" + "\n".join(broken)


def test_a_missing_target_is_reported(tmp_path: Path) -> None:
    md = ROOT / "docs" / "_probe_links.md"
    try:
        md.write_text("[ok](report/README.md) ![gone](report/nothing.png) [web](https://example.org) [a](#x)\n")
        assert broken_links(md) == ["docs/_probe_links.md: report/nothing.png"]
    finally:
        md.unlink()
