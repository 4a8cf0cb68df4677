"""Every option the docs give a `curate` command is run through that command by some test.

The docs (README.md, docs/*.md, train/README.md) name options as `curate SUB ... --flag`; the tests
run commands as `main(["SUB", ..., "--flag", ...])`, `curate("SUB", ..., "--flag")` or a subprocess
list, and README's bash blocks run too (tests/test_readme.py). A documented option that only a
library call exercises fails here: users type the command, not the function.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from curation.cli import build_parser
from tests.helpers import REPO

DOCS = [REPO / "README.md", REPO / "train" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {
        name: {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for name, p in sub.choices.items()
    }


def documented(options: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    """(subcommand, flag) -> where the docs name it: in a `curate SUB ...` command line, or a flag
    of exactly one subcommand named anywhere."""
    found: dict[tuple[str, str], str] = {}
    command = re.compile(r"curate (" + "|".join(options) + r")\b([^`\n]*)")
    for doc in DOCS:
        text = doc.read_text()
        for m in command.finditer(text):
            for flag in FLAG.findall(m.group(2)):
                if flag in options[m.group(1)]:
                    found.setdefault((m.group(1), flag), doc.name)
        for flag in set(FLAG.findall(text)):
            owners = [name for name, flags in options.items() if flag in flags]
            if len(owners) == 1:
                found.setdefault((owners[0], flag), doc.name)
    return found


def _strings(nodes, names: dict[str, list[tuple[int, list[str]]]], line: int) -> list[str]:
    """The string constants of an argument list, lists it unpacks included (`*argv`: the list last
    assigned to `argv` above this line)."""
    out = []
    for n in nodes:
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append(n.value)
        elif isinstance(n, ast.List | ast.Tuple):
            out += _strings(n.elts, names, line)
        elif isinstance(n, ast.Starred) and isinstance(n.value, ast.Name):
            earlier = [words for at, words in names.get(n.value.id, []) if at < line]
            out += earlier[-1] if earlier else []
        elif isinstance(n, ast.Starred):
            out += _strings([n.value], names, line)
    return out


def exercised(options: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(subcommand, flag) pairs some test runs through the command: argument lists whose first
    string is a subcommand (`main([...])`, `curate(...)`, `[sys.executable, "-m", "curation.cli", ...]`),
    and README's bash blocks (executed by tests/test_readme.py)."""
    seen: set[tuple[str, str]] = set()

    def add(words: list[str]) -> None:
        subs = [i for i, w in enumerate(words) if w in options]
        if not subs:
            return
        name = words[subs[0]]
        for w in words[subs[0] + 1 :]:
            flag = w.split("=", 1)[0]
            if flag in options[name]:
                seen.add((name, flag))

    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text())
        names: dict[str, list[tuple[int, list[str]]]] = {}  # argv = ["select", run, "--where", ...]
        assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)]
        for node in sorted(assigns, key=lambda n: n.lineno):
            if isinstance(node.value, ast.List | ast.Tuple):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        words = _strings(node.value.elts, names, node.lineno)
                        names.setdefault(target.id, []).append((node.lineno, words))
        for node in ast.walk(tree):
            if isinstance(node, ast.List | ast.Tuple):
                add(_strings(node.elts, names, node.lineno))
            elif isinstance(node, ast.Call):
                words = _strings(node.args, names, node.lineno)
                if isinstance(node.func, ast.Name) and node.func.id in options:  # a helper named so
                    words = [node.func.id, *words]
                add(words)
    readme_blocks = re.findall(
        r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL
    )
    for block in readme_blocks:
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"\bcurate (\w+)(.*)", line)
            if m and m.group(1) in options:
                add([m.group(1), *m.group(2).split()])
    return seen


def test_every_documented_option_is_run_through_the_command_by_some_test():
    options = subcommand_options()
    missing = sorted(f"curate {sub} {flag} ({doc})" for (sub, flag), doc in documented(options).items()
                     if (sub, flag) not in exercised(options))  # fmt: skip
    assert not missing, "documented but never run through `curate` by a test:\n" + "\n".join(missing)
