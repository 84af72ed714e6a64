"""Pre-training text for the family's base model: English prose shipped with every Python.

No machine here can download a corpus, but every Python installation carries megabytes of
carefully written English in its standard library: module, class and function docstrings and
the comments beside the code. We read them at build time, in sorted file order, so the corpus
(and therefore the base model) is a deterministic function of the installed Python.
"""

from __future__ import annotations

import ast
import io
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

# Folders whose text is mostly test fixtures, vendored code or generated tables.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SKIP_FILES = re.compile(r"^(test_|_pydecimal|_pydatetime|pydoc_data)")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[-=*~^]{3,}|[{}\[\]()]|$)")
_WORDS = re.compile(r"[A-Za-z]{2,}")
MIN_PARAGRAPH_CHARS = 40
MIN_CODE_CHARS, MAX_CODE_CHARS = 200, 4000


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> Iterator[Path]:
    """Every ``.py`` file under ``root``, in a platform-independent sorted order."""
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py") and not _SKIP_FILES.match(name):
                yield Path(current) / name


def _is_prose(paragraph: str) -> bool:
    """Keep paragraphs that read like English: long enough and mostly words."""
    if len(paragraph) < MIN_PARAGRAPH_CHARS:
        return False
    letters = sum(len(w) for w in _WORDS.findall(paragraph))
    return letters >= 0.6 * len(paragraph)


def _paragraphs(text: str) -> Iterator[str]:
    """Split a docstring or comment block into prose paragraphs, dropping code lines."""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if not _CODE_LINE.match(ln)]
        paragraph = " ".join(ln for ln in lines if ln)
        if _is_prose(paragraph):
            yield paragraph


def _docstrings(tree: ast.AST) -> Iterator[str]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _comment_blocks(source: str) -> Iterator[str]:
    """Runs of consecutive ``#`` comments, joined into one block each."""
    block: list[str] = []
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if tok.start[0] != last_line + 1 and block:
                yield "\n".join(block)
                block = []
            block.append(text)
            last_line = tok.start[0]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    if block:
        yield "\n".join(block)


def _file_paragraphs(path: Path) -> Iterator[str]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    for doc in _docstrings(tree):
        yield from _paragraphs(doc)
    for block in _comment_blocks(source):
        yield from _paragraphs(block)


def stdlib_code(max_chars: int, root: Path | None = None) -> list[str]:
    """Up to ``max_chars`` of top-level code blocks (functions, classes) from the stdlib.

    Code repeats its identifiers within a few lines, which is what teaches a small model to
    attend back and copy (induction heads): the skill every specialist task needs (copying
    numbers into SQL, words into a translation). Blocks are the chunks between PEP 8's double
    blank lines, in sorted file order.
    """
    blocks: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in _python_files(root or stdlib_root()):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for block in re.split(r"\n\s*\n\s*\n", source):
            block = block.strip("\n")
            if not MIN_CODE_CHARS <= len(block) <= MAX_CODE_CHARS or block in seen:
                continue
            seen.add(block)
            blocks.append(block)
            total += len(block) + 1
            if total >= max_chars:
                return blocks
    return blocks


def stdlib_corpus(max_chars: int, root: Path | None = None) -> list[str]:
    """Up to ``max_chars`` of distinct English paragraphs from the standard library.

    Deterministic for a given Python installation: files are visited in sorted order and
    duplicates (licence headers, boilerplate) are kept once.
    """
    seen: set[str] = set()
    paragraphs: list[str] = []
    total = 0
    for path in _python_files(root or stdlib_root()):
        for paragraph in _file_paragraphs(path):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            paragraphs.append(paragraph)
            total += len(paragraph) + 1
            if total >= max_chars:
                return paragraphs
    return paragraphs
