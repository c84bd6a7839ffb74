"""The README's table of the seed's claims points at notebook sections that exist."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent


def sections(number: str) -> set[str]:
    """The numbers of the ``## k. Title`` headings of notebook ``number`` (e.g. "07")."""
    path, = (REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb")
    return {m.group(1) for c in nbformat.read(path, 4).cells if c.cell_type == "markdown"
            for m in re.finditer(r"^## (\d+)\. ", c.source, re.MULTILINE)}


def test_every_claim_of_the_seed_points_at_sections_that_exist():
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("### The seed's claims", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| ---")][1:]
    assert len(rows) >= 10, "the table of the seed's claims is missing or cut short"
    missing = []
    for row in rows:
        claim, where, shows = (cell.strip() for cell in row.strip("|").split(" | "))
        refs = re.findall(r"(\d\d) §(\d+)", where)
        assert refs and claim and shows, f"a row without a section, claim or finding: {row}"
        missing += [f"{nb} §{k} ({claim[:40]})" for nb, k in refs if k not in sections(nb)]
    assert not missing, "no such section: " + ", ".join(missing)
