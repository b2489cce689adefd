"""The code keeps its shape: small modules that say what they do, short functions, ARCHITECTURE.md true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# A longer function says why in its docstring, in a sentence that starts with "Long because".
LONG_REASON = "Long because"


def source_files() -> list[Path]:
    files = [ROOT / "serve_app.py", *sorted((ROOT / "actors").rglob("*.py"))]
    files += [path for path in sorted((ROOT / "mycellm").rglob("*.py")) if "migrations" not in path.parts]
    return files


def test_every_module_is_small_and_opens_with_what_it_does() -> None:
    for path in source_files():
        text = path.read_text()
        lines = len(text.splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring, f"{path.relative_to(ROOT)} does not open with a docstring"


def test_functions_are_short_or_say_why() -> None:
    long = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines without a reason:\n" + "\n".join(long)


def test_architecture_lists_every_module_and_only_existing_ones() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"^\s*[│├└─ ]*([a-z_]+\.py)\b", text, flags=re.MULTILINE))
    for path in source_files():
        if path.name != "__init__.py":
            assert path.name in listed, f"ARCHITECTURE.md does not list {path.relative_to(ROOT)}"
    named = set(re.findall(r"`((?:mycellm|actors)/[a-z_/]+\.py)`", text))
    for relative in named:
        assert (ROOT / relative).is_file(), f"ARCHITECTURE.md names {relative}, which does not exist"
