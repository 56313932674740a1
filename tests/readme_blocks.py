"""README's shell examples as data, for the docs test (tests/e2e/test_readme.py). Pure.

Every ```sh block of README.md is an example a user will paste, so every one is run,
unless the line before its fence says `<!-- readme-test: skip (why) -->`. A comment
line in a block that holds JSON (`# {"accepted":1,...}`) is the documented answer of
the command above it: the command's output must hold a JSON value of that shape, in
the block's order (see `shape_errors`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SKIP = "<!-- readme-test: skip"
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\S*)\s*$")
_HEADING = re.compile(r"^#{1,6} (?P<title>.+)$")


@dataclass(frozen=True, slots=True)
class Block:
    line: int  # of the opening fence, 1-based
    section: str  # the heading it is under
    code: str
    expected: tuple[Any, ...]  # the documented JSON answers, in order

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def shell_blocks(markdown: str) -> list[Block]:
    """Every ```sh block not marked to be skipped, with its documented answers."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        heading = _HEADING.match(lines[i])
        if heading:
            section = heading["title"]
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence["indent"], i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i].removeprefix(indent))
            i += 1
        i += 1
        skipped = start > 0 and lines[start - 1].strip().startswith(SKIP)
        if fence["lang"] == "sh" and not skipped:
            code = "\n".join(body) + "\n"
            blocks.append(Block(start + 1, section, code, tuple(expectations(code))))
    return blocks


def expectations(code: str) -> list[Any]:
    """The JSON values written as comment lines (`# {...}`, `# [...]`); they must be valid JSON."""
    found = []
    for line in code.splitlines():
        text = line.strip()
        if text.startswith(("# {", "# [")):
            found.append(json.loads(text[2:]))  # a documented answer that is not JSON is a README bug
    return found


def json_values(output: str) -> list[Any]:
    """Every JSON object or array in `output`, in order (curl prints answers without a newline)."""
    decoder = json.JSONDecoder()
    values = []
    i = 0
    while i < len(output):
        if output[i] in "{[":
            try:
                value, end = decoder.raw_decode(output, i)
            except ValueError:
                i += 1
                continue
            values.append(value)
            i = end
        else:
            i += 1
    return values


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "null")


def shape_errors(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """How `actual` differs from the documented `expected`, by shape, not value.

    Every key the documentation shows must be there, with the same JSON type (more keys
    may be); a documented `null` stands for any value; every element of an array must
    have the shape of the documented first element.
    """
    if expected is None:
        return []
    if _kind(expected) != _kind(actual):
        return [f"{path}: documented a {_kind(expected)}, got {_kind(actual)} {json.dumps(actual)[:80]}"]
    if isinstance(expected, dict):
        errors = []
        for key, value in expected.items():
            if key not in actual:
                errors.append(f"{path}: no key {key!r} (has {sorted(actual)})")
            else:
                errors += shape_errors(value, actual[key], f"{path}.{key}")
        return errors
    if isinstance(expected, list) and expected:
        return [e for i, item in enumerate(actual) for e in shape_errors(expected[0], item, f"{path}[{i}]")]
    return []


def unmatched(expected: tuple[Any, ...], output: str) -> list[str]:
    """The documented answers that `output` does not show, in order; [] when all are there."""
    values = json_values(output)
    problems = []
    at = 0
    for want in expected:
        for j in range(at, len(values)):
            if not shape_errors(want, values[j]):
                at = j + 1
                break
        else:
            closest = [e for v in values[at:] for e in shape_errors(want, v)][:3]
            problems.append(f"no answer shaped like {json.dumps(want)[:120]} ({'; '.join(closest) or 'no JSON'})")
    return problems
