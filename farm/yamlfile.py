"""YAML from an untrusted file: limits first, then data and the line of every value.

A manifest is input from anyone, so it is checked before anything walks it:
- at most ``MAX_MANIFEST_BYTES`` of text (read no more than that);
- nesting at most ``MAX_YAML_DEPTH`` levels, checked on the parser's event stream, which never
  recurses (a 5,000-level file would otherwise end in a RecursionError);
- aliases may repeat at most ``MAX_YAML_NODES`` values beyond those written, and may not nest
  deeper than the limit either, both computed on the composed graph with each node's size and
  depth worked out once (a 1 KB "billion laughs" file is refused in microseconds, not expanded
  for minutes); a recursive alias is refused.
Then the document is composed once; the data is constructed from that same graph, and the line of
each key and item is indexed from it for error messages. Valid but unusual files keep working: a
UTF-8 byte-order mark, CRLF line endings, any Unicode, merge keys (``<<: *base``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from farm.config import MAX_MANIFEST_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES
from farm.errors import ManifestError

DataPath = tuple[str | int, ...]  # a place in the data, e.g. ("axes", "platform", 0)
Lines = dict[DataPath, int]

# libyaml's parser when this PyYAML has it (far faster on large files), else the pure-Python one.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_size(size: int, file: str) -> None:
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"the manifest is larger than the {MAX_MANIFEST_BYTES // 2**20} MB limit",
            file=file,
            hint="move long lists into a rows: file (CSV or Parquet)",
        )


def read(path: Path) -> str:
    """A manifest's text, reading at most the limit (a FIFO or /dev/zero has no size to stat)."""
    with path.open("rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    check_size(len(raw), str(path))
    return raw.decode("utf-8")


def parse(text: str, file: str) -> tuple[Any, Lines]:
    """The data of a YAML document and the line of each of its values (by data path)."""
    check_size(len(text.encode("utf-8", "surrogatepass")), file)
    try:
        _check_depth(text, file)
        root = yaml.compose(text, Loader=_Loader)
        if root is None:
            raise ManifestError("the manifest is empty", file=file, hint="start from manifests/demo.yaml")
        _check_graph(root, file)
        lines: Lines = {}
        _index_lines(root, (), lines, file, set())  # before constructing: merge keys rewrite the graph
        data = yaml.SafeLoader("").construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestError(
            f"YAML syntax error: {problem}",
            file=file,
            line=mark.line + 1 if mark else None,
            hint="fix the indentation or quoting on that line",
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"YAML error: {str(exc).splitlines()[0]}", file=file) from None
    except ValueError as exc:  # a value PyYAML cannot convert, e.g. an integer of 5,000 digits
        raise ManifestError(f"a value cannot be read: {str(exc).splitlines()[0][:200]}", file=file) from None
    return data, lines


def _check_depth(text: str, file: str) -> None:
    try:
        _walk_depth(text, file)
    except yaml.MarkedYAMLError as exc:  # libyaml's own, far higher, nesting limit came first
        if "nesting depth" not in str(exc.problem):
            raise
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise _too_deep(file, line) from None


def _too_deep(file: str, line: int | None, through_aliases: bool = False) -> ManifestError:
    return ManifestError(
        f"nesting deeper than {MAX_YAML_DEPTH} levels" + (" through aliases" if through_aliases else ""),
        file=file,
        line=line,
        hint="a manifest needs a few levels: flatten the structure",
    )


def _walk_depth(text: str, file: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _too_deep(file, event.start_mark.line + 1 if event.start_mark else None)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_graph(root: yaml.Node, file: str) -> None:
    """What aliases add, without expanding anything: the values they repeat (at most
    MAX_YAML_NODES more than are written) and the depth they reach (at most MAX_YAML_DEPTH).
    Iterative, with each node's expanded size and depth computed once: a crafted file may nest
    aliases thousands of levels deep, or refer to a value from inside it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_.discard(key)
            if depth[key] > MAX_YAML_DEPTH + 1:  # + 1: a scalar is a level of its own here
                raise _too_deep(file, node.start_mark.line + 1, through_aliases=True)
            continue
        if key in size:
            continue
        if key in open_:
            raise ManifestError(
                "an alias refers to a value that contains it",
                file=file,
                line=node.start_mark.line + 1,
                hint="remove the recursive alias",
            )
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    written = len(size)
    if size[id(root)] - written > MAX_YAML_NODES:
        raise ManifestError(
            f"aliases repeat values past the limit: {size[id(root)] - written:,} more values than are written "
            f"(at most {MAX_YAML_NODES:,})",
            file=file,
            line=root.start_mark.line + 1,
            hint="write the values out, or move long lists into a rows: file",
        )


def _index_lines(node: yaml.Node, path: DataPath, lines: Lines, file: str, seen_nodes: set[int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen_nodes:  # an alias: its values' lines are where it was written; walk it once
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen and key != "<<":
                raise ManifestError(
                    f"key {key!r} appears twice",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    field=field_name((*path, key)),
                    hint="keep one of them",
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), lines, file, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines, file, seen_nodes)


def line_of(lines: Lines, path: tuple[Any, ...]) -> int | None:
    """The line of the value at ``path``, or of the nearest enclosing value that has one."""
    for end in range(len(path), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in path[:end])
        if key in lines:
            return lines[key]
    return None


def field_name(path: tuple[Any, ...]) -> str:
    """``("axes", "platform", 0)`` → ``axes.platform[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
