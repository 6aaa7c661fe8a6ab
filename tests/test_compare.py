"""The side-by-side view of native and wasm outputs."""

from __future__ import annotations

from wasmforge.compare import Side, side_by_side


def test_marks_changed_and_one_sided_lines():
    left = Side("native", "same\nLinux host\nonly native\ntail\n", 0)
    right = Side("wasm", "same\nwasi wasm32\ntail\nonly wasm\n", 1)
    rows = side_by_side(left, right, width=60).splitlines()
    column = (60 - 3) // 2
    assert rows[0].startswith("native") and rows[0].endswith("wasm")
    body = rows[2:]
    assert body[0] == f"{'same':<{column}}   same"
    assert body[1] == f"{'Linux host':<{column}} | wasi wasm32"
    assert body[2].startswith("only native") and body[2].rstrip().endswith("<")
    assert body[3] == f"{'tail':<{column}}   tail"
    assert body[4].endswith("> only wasm")
    assert body[5] == f"{'(exit status 0)':<{column}} | (exit status 1)"


def test_long_lines_are_cut_to_the_column():
    left = Side("native", "x" * 200, 0)
    rows = side_by_side(left, Side("wasm", "y", 0), width=61).splitlines()
    assert len(rows[2].split(" | ")[0]) == 29 and rows[2].split(" | ")[0].endswith("…")

