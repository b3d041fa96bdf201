"""Prompt templates, the one placeholder grammar: ``{name}`` (a Python identifier) is filled per
variant; ``{{`` and ``}}`` stand for literal braces. Nothing else is special: no format specs,
no attribute or index access, so a prompt can never reach into farm's objects."""

from __future__ import annotations

import functools
from dataclasses import dataclass


class TemplateError(ValueError):
    """A template that does not parse; the message says where and what."""


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, placeholder name or None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self.parts if name is not None))

    def fill(self, values: dict[str, str], default: str | None = None) -> str:
        """The text with every placeholder replaced; a missing value is ``default``, or a KeyError."""
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                out.append(values[name] if default is None else values.get(name, default))
        return "".join(out)


@functools.lru_cache(maxsize=4096)
def parse_template(text: str) -> Template:
    """Parse ``text``; raises TemplateError for a lone brace or a placeholder that is not a name."""
    parts: list[tuple[str, str | None]] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
        elif ch == "}":
            raise TemplateError(f"lone '}}' at character {i + 1}")
        elif ch == "{":
            end = text.find("}", i + 1)
            name = text[i + 1 : end] if end != -1 else ""
            if end == -1 or "{" in name:
                raise TemplateError(f"unclosed '{{' at character {i + 1}")
            if not name.isidentifier():
                raise TemplateError(f"placeholder {{{name}}} must be a plain name like {{product}}")
            parts.append(("".join(literal), name))
            literal = []
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    if literal or not parts:
        parts.append(("".join(literal), None))
    return Template(text, tuple(parts))
