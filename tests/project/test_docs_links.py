"""Every relative link in the docs leads somewhere: the file exists, and a `#fragment` names one of its headings.

Covers README.md, CONTRIBUTING.md, bench/README.md, docs/*.md and the installers' READMEs. Fragments follow
GitHub's heading anchors (lower case, punctuation dropped, spaces to hyphens, `-1`, `-2` for repeats), since that
is where they are read.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from tests.conftest import REPO

PAGES = sorted(
    [
        *(REPO / name for name in ("README.md", "CONTRIBUTING.md", "bench/README.md")),
        *(REPO / "docs").glob("*.md"),
        *(REPO / "installers").rglob("README.md"),
    ]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...: not ours to check
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / unquote(path)).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    return broken


def test_the_pages_checked_exist() -> None:
    assert [page.name for page in PAGES if not page.exists()] == []


def test_every_relative_link_leads_to_a_file_and_heading_that_exist() -> None:
    assert [link for page in PAGES if page.exists() for link in broken_links(page)] == []
