"""The repository is self-contained: every document its code, tests and docs cite is in it."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def test_every_cited_document_exists():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    missing = []
    for name in files:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".sh", ".txt", ".yaml", ".tpl", ".cc", "") or not path.is_file():
            continue
        for cited in set(CITED.findall(path.read_text(errors="replace"))):
            if not any((base / cited).is_file() for base in (REPO, path.parent, REPO / "docs")):
                missing.append(f"{name}: {cited}")
    assert not missing, missing
