"""Every ```python block of README.md and docs/*.md runs, and runs correctly.

Documentation that is not executed drifts from the code, so each block is a
test of its own (ids like ``README.md:1``: the file and the block's number in
it). A block is executed as a fresh module, so it must be complete: its own
imports, its own definitions. Its ``__name__`` is not ``"__main__"``, so code
under ``if __name__ == "__main__":`` does not run; top-level statements (such
as ``trio.run(main)``) do, and their asserts are the test.

A block whose first line is ``# test-example`` shows pytest tests. It is
executed to define them, and then each ``test_*`` function it defines is
called: async ones under ``trio.run``, as pytest-trio would. The only
fixture supplied is ``autojump_clock``, the one the docs use.

Code that cannot run here (it needs a PostgreSQL server, signals or a
deployment) is fenced ```py instead; say why in the text around it. Such a
block is still checked as far as it can be without running it: it must
compile, and its top-level imports are executed, so a renamed module or
function fails here too (ids like ``docs/operations.md:py1``). Any other
fence (```text, ```sh, ```yaml) is prose to this file.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_EXAMPLE_MARK = "# test-example"
TIME_BUDGET = 1.0
"""Seconds of wall time per block. Examples are meant to be instant (timeouts
and idle times run under a mock clock); a block over budget is most likely
sleeping on the real clock by mistake."""

EXPECTED_DOCUMENTS = {
    "README.md",
    "docs/architecture.md",
    "docs/concepts.md",
    "docs/errors.md",
    "docs/operations.md",
    "docs/testing.md",
}
"""Each of them must be found, and must hold at least one block that runs."""


def _fence(language: str) -> re.Pattern[str]:
    # A fence opens with ```<language> alone on its line and closes with ```
    # alone on its line; the body is everything between.
    return re.compile(rf"^```{language}[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


_RUN_FENCE = _fence("python")
_SHOWN_FENCE = _fence("py")


class Block(NamedTuple):
    document: Path
    number: int  # 1-based, among the document's blocks of the same fence
    line: int  # 1-based line of the block's first code line in the document
    source: str
    prefix: str = ""  # "" for ```python blocks, "py" for ```py ones

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT).as_posix()}:{self.prefix}{self.number}"


def blocks_of(document: Path, fence: re.Pattern[str], prefix: str = "") -> Iterator[Block]:
    text = document.read_text(encoding="utf-8")
    for number, match in enumerate(fence.finditer(text), start=1):
        line = text.count("\n", 0, match.start("body")) + 1
        yield Block(document, number, line, match.group("body"), prefix)


BLOCKS = [block for document in DOCUMENTS for block in blocks_of(document, _RUN_FENCE)]
SHOWN_BLOCKS = [
    block for document in DOCUMENTS for block in blocks_of(document, _SHOWN_FENCE, "py")
]


def compile_block(block: Block) -> types.CodeType:
    # Padding with blank lines makes tracebacks point at the markdown line.
    padded = "\n" * (block.line - 1) + block.source
    return compile(padded, str(block.document), "exec", dont_inherit=True)


def run_as_module(block: Block) -> dict[str, Any]:
    """Execute ``block`` as a module of its own; return its namespace.

    The module is in ``sys.modules`` while it runs, because msgspec, attrs
    and typing resolve annotations through the defining class's module.
    """
    stem = re.sub(r"\W", "_", block.document.stem)
    module = types.ModuleType(f"docs_example_{stem}_{block.number}")
    module.__file__ = str(block.document)
    sys.modules[module.__name__] = module
    try:
        exec(compile_block(block), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


def run_test_function(name: str, function: Callable[..., Any]) -> None:
    """Call one pytest-style test, providing the fixtures the docs use."""
    parameters = list(inspect.signature(function).parameters)
    unknown = sorted(set(parameters) - {"autojump_clock"})
    if unknown:
        pytest.fail(f"{name} asks for fixtures that test_docs.py does not provide: {unknown}")
    if not inspect.iscoroutinefunction(function):
        function()
        return
    if parameters:
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(function, clock, clock=clock)
    else:
        trio.run(function)


def test_every_document_has_been_found() -> None:
    # A glob that silently matches nothing would make this whole file pass.
    found = {document.relative_to(ROOT).as_posix() for document in DOCUMENTS}
    assert not EXPECTED_DOCUMENTS - found, "documents not found"
    with_examples = {block.name.partition(":")[0] for block in BLOCKS}
    assert not EXPECTED_DOCUMENTS - with_examples, "documents without a ```python block"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_runs(block: Block) -> None:
    started = time.perf_counter()
    namespace = run_as_module(block)
    if block.source.startswith(TEST_EXAMPLE_MARK):
        tests = {
            name: value
            for name, value in namespace.items()
            if name.startswith("test_") and inspect.isfunction(value)
        }
        assert tests, f"{block.name} is marked {TEST_EXAMPLE_MARK!r} but defines no test_*"
        for name, function in tests.items():
            run_test_function(f"{block.name} {name}", function)
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_BUDGET, f"{block.name} took {elapsed:.2f} s"


@pytest.mark.parametrize("block", SHOWN_BLOCKS, ids=[block.name for block in SHOWN_BLOCKS])
def test_shown_block_compiles_and_imports(block: Block) -> None:
    compile_block(block)
    # Only the imports run: they are what drifts when the code is reorganised.
    tree = ast.parse("\n" * (block.line - 1) + block.source, str(block.document))
    imports: list[ast.stmt] = [
        node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert imports, f"{block.name} imports nothing, so nothing of it is checked"
    module = ast.Module(body=imports, type_ignores=[])
    exec(compile(module, str(block.document), "exec", dont_inherit=True), {})
