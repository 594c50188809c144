"""The docs harness: every Python example in the docs comes from a file a test runs.

1. A fenced Python block in `docs/**/*.md` may hold nothing but `--8<--` snippet includes of
   files under `docs/examples/` or `examples/` (whole file, or a named section).
2. Every included file (and section) exists.
3. Every `docs/examples/*.py` file is named by some test under `tests/`, so it runs.
4. README's Python block is a verbatim part of `examples/fastapi_app.py` (GitHub cannot include).
5. `mkdocs build --strict` passes (also run by `.ci/run`; here so that a plain pytest catches a
   broken page before CI does).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ALLOWED_DIRS = ("docs/examples/", "examples/")

FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
PYTHON_INFO = re.compile(r"^\{?[ \t]*\.?(python3?|py|pycon)\b", re.IGNORECASE)
SNIPPET = re.compile(r'^--8<--[ \t]+"(?P<target>[^"]+)"$')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    info: str
    body: list[str]

    @property
    def is_python(self) -> bool:
        return bool(PYTHON_INFO.match(self.info.strip()))

    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their indentation removed."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE_OPEN.match(lines[i])
        if opened is None:
            i += 1
            continue
        indent, fence = opened["indent"], opened["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"{path.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        blocks.append(Block(path, i + 1, opened["info"], body))
        i = j + 1
    return blocks


def markdown_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "examples" not in p.relative_to(DOCS).parts)


def python_blocks() -> list[Block]:
    return [block for page in markdown_pages() for block in fenced_blocks(page) if block.is_python]


def snippet_targets(block: Block) -> list[str]:
    """The include targets of a block; fails the test if the block holds anything else."""
    targets: list[str] = []
    for raw in block.body:
        line = raw.strip()
        if not line:
            continue
        found = SNIPPET.match(line)
        assert found is not None, (
            f"{block.where()}: inline Python in the docs. Put the code in a file under "
            f'docs/examples/ or examples/ that a test runs, and include it with --8<-- "<file>"'
        )
        targets.append(found["target"])
    assert targets, f"{block.where()}: empty Python block"
    return targets


def split_target(target: str) -> tuple[str, str | None]:
    """`path` or `path:section` (line ranges are refused: they rot silently)."""
    path, _, section = target.partition(":")
    if section and not re.fullmatch(r"[A-Za-z_][\w-]*", section):
        raise AssertionError(f"{target!r}: include a named section, not a line range")
    return path, section or None


def section_lines(text: str, section: str) -> list[str] | None:
    """The lines between `# --8<-- [start:section]` and `# --8<-- [end:section]`."""
    lines = text.splitlines()
    start = f"--8<-- [start:{section}]"
    end = f"--8<-- [end:{section}]"
    starts = [i for i, line in enumerate(lines) if line.strip().endswith(start)]
    ends = [i for i, line in enumerate(lines) if line.strip().endswith(end)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0]:
        return None
    return lines[starts[0] + 1 : ends[0]]


def test_the_docs_have_python_examples() -> None:
    # Guards the parser itself: if it stopped finding blocks, the checks below would pass vacuously.
    assert (DOCS / "index.md").exists()
    assert len(python_blocks()) >= 10


def test_every_python_block_is_a_snippet_of_an_example_file() -> None:
    for block in python_blocks():
        for target in snippet_targets(block):
            path, _ = split_target(target)
            assert path.startswith(ALLOWED_DIRS), (
                f"{block.where()}: {path} is not under docs/examples/ or examples/"
            )


def test_every_included_file_and_section_exists() -> None:
    for block in python_blocks():
        for target in snippet_targets(block):
            path, section = split_target(target)
            file = ROOT / path
            assert file.is_file(), f"{block.where()}: {path} does not exist"
            if section is not None:
                lines = section_lines(file.read_text(encoding="utf-8"), section)
                assert lines, f"{block.where()}: {path} has no (or an empty) section {section!r}"


def test_the_parser_refuses_inline_python(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\nprint('inline')\n```\n\n"
        '!!! note\n    ```py title="x"\n    --8<-- "examples/one_liner.py"\n    ```\n'
        "\n```bash\necho not python\n```\n",
        encoding="utf-8",
    )
    blocks = fenced_blocks(page)
    assert [b.is_python for b in blocks] == [True, True, False]
    with pytest.raises(AssertionError, match="inline Python"):
        snippet_targets(blocks[0])
    assert snippet_targets(blocks[1]) == ["examples/one_liner.py"]
    with pytest.raises(AssertionError, match="line range"):
        split_target("examples/one_liner.py:3:9")


def test_every_docs_example_file_is_run_by_a_test() -> None:
    test_sources = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("test_*.py")
    )
    for example in sorted((DOCS / "examples").glob("*.py")):
        assert example.stem in test_sources, (
            f"docs/examples/{example.name} is not named by any test under tests/"
        )


def test_readme_python_is_taken_from_the_fastapi_example() -> None:
    readme = fenced_blocks(ROOT / "README.md")
    python = [block for block in readme if block.is_python]
    assert len(python) == 1, "README has one Python example: the FastAPI app"
    source = section_lines(
        (ROOT / "examples" / "fastapi_app.py").read_text(encoding="utf-8"), "readme"
    )
    assert source is not None, "examples/fastapi_app.py lacks its `readme` section"

    def strip(lines: list[str]) -> str:
        return "\n".join(lines).strip("\n")

    assert strip(python[0].body) == strip(source), (
        "README's FastAPI example differs from examples/fastapi_app.py's `readme` section"
    )


def test_readme_keeps_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[examples]' "
        "&& .venv/bin/python examples/checkout.py",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest",
    ):
        assert command in readme


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is in the dev extra")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "index.html").is_file()
