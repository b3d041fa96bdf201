"""House rule, checked in CI: no function in farm/ over 60 lines, no class over 300, no module over
600, unless the definition's line carries a ``# size: <reason>`` comment saying why."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMITS = {"function": 60, "class": 300}
MODULE_LIMIT = 600


def problems(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MODULE_LIMIT and "# size:" not in lines[0]:
            found.append(f"{path}: module of {len(lines)} lines (limit {MODULE_LIMIT})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "function"
            else:
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > LIMITS[kind] and "# size:" not in lines[node.lineno - 1]:
                found.append(f"{path}:{node.lineno}: {kind} {node.name} has {size} lines (limit {LIMITS[kind]})")
    return found


if __name__ == "__main__":
    found = problems(Path(sys.argv[1] if len(sys.argv) > 1 else "farm"))
    for line in found:
        print(line)
    sys.exit(1 if found else 0)
