"""Every relative link and image in the project's Markdown points at a file that exists (reports move figures), and
every anchor (``#section``, here or in another Markdown file) at a heading there (reports rename sections)."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _markdown() -> list[Path]:
    skip = {"third_party", ".git", "outputs", "logs", ".ci-venv", ".venv"}
    return [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)]


def anchors(md: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-") for h in heads}


def broken_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks are not links
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        page = md.parent / path if path else md
        if not page.exists():
            out.append(f"{md.relative_to(ROOT)}: {target}")
        elif anchor and page.suffix == ".md" and anchor not in anchors(page):
            out.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    return out


def test_relative_links_resolve() -> None:
    broken = [b for md in _markdown() for b in broken_links(md)]
    assert broken == [], "broken links:\n" + "\n".join(broken)


def test_a_missing_target_is_reported(tmp_path: Path) -> None:
    md = ROOT / "docs" / "_probe_links.md"
    try:
        md.write_text("# A heading, with `code`\n[ok](report/README.md) ![gone](report/nothing.png) "
                      "[web](https://example.org) [a](#x) [b](#a-heading-with-code) [c](report/README.md#what-is-left) "
                      "[d](report/README.md#what-is-gone)\n")
        assert broken_links(md) == ["docs/_probe_links.md: report/nothing.png",
                                    "docs/_probe_links.md: #x (no such heading)",
                                    "docs/_probe_links.md: report/README.md#what-is-gone (no such heading)"]
    finally:
        md.unlink()
