"""The docs test's reading of README (tests/readme_blocks.py)."""

from __future__ import annotations

from pathlib import Path

from tests.readme_blocks import shape_errors, shell_blocks, unmatched

MARKDOWN = """# Title

## Quick start

```sh
curl -sS localhost:8000/x
# {"accepted":1,"rejected":[{"index":1,"error":"bad"}]}
```

<!-- readme-test: skip (it builds the world) -->
```sh
make everything
```

- a list item with a block:

  ```sh
  tally retention --dry-run
  ```

```toml
[[rollup]]
```
"""


def test_blocks_are_the_sh_fences_not_marked_skip() -> None:
    blocks = shell_blocks(MARKDOWN)
    assert [(b.line, b.section, b.code) for b in blocks] == [
        (5, "Quick start", 'curl -sS localhost:8000/x\n# {"accepted":1,"rejected":[{"index":1,"error":"bad"}]}\n'),
        (17, "Quick start", "tally retention --dry-run\n"),
    ]
    assert blocks[0].expected == ({"accepted": 1, "rejected": [{"index": 1, "error": "bad"}]},)


def test_shape_is_keys_and_types_not_values() -> None:
    doc = {"accepted": 1, "rejected": [{"index": 1, "error": "bad"}], "next": None}
    assert shape_errors(doc, {"accepted": 7, "rejected": [], "next": "abc", "extra": True}) == []
    assert shape_errors(doc, {"accepted": "7", "rejected": [], "next": None}) == [
        "$.accepted: documented a number, got string \"7\""
    ]
    assert shape_errors(doc, {"accepted": 1, "rejected": [{"index": 0}], "next": 1}) == [
        "$.rejected[0]: no key 'error' (has ['index'])"
    ]
    assert shape_errors(True, 1) == ["$: documented a boolean, got number 1"]


def test_answers_are_found_in_order_in_output_without_newlines() -> None:
    out = 'id 1\n{"a":1}{"b":[1,2]}tally.events[0]@4 {"c":"x"}'
    assert unmatched(({"a": 0}, {"c": ""}), out) == []
    assert unmatched(({"c": ""}, {"a": 0}), out) != []  # order matters
    # curl's glob error prints no JSON at all: the documented answer is missing.
    assert unmatched(({"data": []},), "curl: (3) bad range in URL position 74") == [
        'no answer shaped like {"data": []} (no JSON)'
    ]


def test_readme_blocks_parse() -> None:
    """Every documented answer in README is valid JSON (the e2e test runs the blocks)."""
    blocks = shell_blocks((Path(__file__).parents[2] / "README.md").read_text())
    assert len(blocks) >= 8
    assert all(b.code.strip() for b in blocks)
