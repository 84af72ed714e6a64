"""The README stays a short manual that starts with the two set-up commands, and every relative
link in it, in ``docs/`` and in ``examples/README.md`` points at a file (and heading) that
exists."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT_BYTES = 15_000
PAGES = sorted([README, ROOT / "examples" / "README.md", *(ROOT / "docs").rglob("*.md")])

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a YAML comment in a block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of a Markdown text, in order, as lists of lines."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = anchor(match.group(1))
            name, n = base, 1
            while name in found:  # repeated headings get -1, -2, ... as on GitHub
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def relative_links(page: Path) -> list[str]:
    """Targets of the page's Markdown links that are not web addresses."""
    text = "\n".join(prose_lines(page.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`]*`", "", text)  # inline code is not a link
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE)
    ]


def test_readme_is_at_most_15_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes"


def test_readme_starts_with_make_demo_then_make_test() -> None:
    text = README.read_text(encoding="utf-8")
    first_block = code_blocks(text)[0]
    commands = [line.split("#")[0].strip() for line in first_block]
    assert [c for c in commands if c][:2] == ["make demo", "make test"]
    before = text[: text.index("make demo")]
    assert before.count("\n## ") <= 1, "the set-up commands must come first"


def test_makefile_has_the_two_targets() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = unquote(target).partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.is_file():
            broken.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target} (no heading #{fragment})")
    assert not broken, f"{page.relative_to(ROOT)}: " + ", ".join(broken)


def test_link_checker_sees_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A `code` heading: yes\n\n[ok](#a-code-heading-yes) [web](https://x.y)\n"
        "```yaml\n# not a heading\n[not a link](nowhere.md)\n```\n[missing](nowhere.md)\n"
    )
    assert anchors(page) == {"title", "a-code-heading-yes"}
    assert relative_links(page) == ["#a-code-heading-yes", "nowhere.md"]
