"""Patch series apply strictly: no fuzz, and a failure names the patch, file and hunk."""

from __future__ import annotations

import pytest

from wasmforge.errors import PatchError, RecipeError
from wasmforge.patches import apply_series, patch_series

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 31))

GOOD = """\
Change line 10 for WASI.

--- a/file.txt
+++ b/file.txt
@@ -8,6 +8,6 @@
 line 8
 line 9
-line 10
+line ten
 line 11
 line 12
 line 13
@@ -20,3 +20,3 @@
 line 20
-line 21
+line twenty-one
 line 22
"""


def _tree(tmp_path, text=ORIGINAL):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file.txt").write_text(text)
    return tree


def test_series_applies_in_order(project, tmp_path):
    project.patch("pkg", "1", "0001-first.patch", GOOD)
    project.patch("pkg", "1", "0002-second.patch", GOOD.replace("line ten", "line 10").replace("-line 10", "-line ten")
                  .replace("-line 21\n+line twenty-one", "-line twenty-one\n+line 21"))
    tree = _tree(tmp_path)
    patches = patch_series(project.config.patches_dir, "pkg", "1", where="x")
    assert [p.name for p in patches] == ["0001-first.patch", "0002-second.patch"]
    apply_series(tree, patches[:1], tmp_path / "patch.log")
    assert "line ten\n" in (tree / "file.txt").read_text()
    apply_series(tree, patches[1:], tmp_path / "patch.log")
    assert (tree / "file.txt").read_text() == ORIGINAL


def test_failed_hunk_names_patch_file_and_hunk(project, tmp_path):
    path = project.patch("pkg", "1", "0001-first.patch", GOOD)
    tree = _tree(tmp_path, ORIGINAL.replace("line 21\n", "line XXI\n"))
    with pytest.raises(PatchError) as info:
        apply_series(tree, patch_series(project.config.patches_dir, "pkg", "1", where="x"), tmp_path / "patch.log")
    err = info.value
    assert "0001-first.patch does not apply cleanly" in err.what
    # Hunk 2 starts at line 13 of the patch file.
    assert f"{path}:13: hunk #2 for file.txt does not apply" in err.details
    assert str(tmp_path / "patch.log") in err.details


def test_fuzz_is_refused(project, tmp_path):
    project.patch("pkg", "1", "0001-first.patch", GOOD)
    # Only a context line differs: GNU patch would apply this with fuzz 1 by default.
    tree = _tree(tmp_path, ORIGINAL.replace("line 13\n", "line thirteen\n"))
    with pytest.raises(PatchError) as info:
        apply_series(tree, patch_series(project.config.patches_dir, "pkg", "1", where="x"), tmp_path / "patch.log")
    assert "hunk #1 for file.txt" in info.value.details


def test_missing_series_is_a_recipe_error(project):
    with pytest.raises(RecipeError) as info:
        patch_series(project.config.patches_dir, "pkg", "9", where="recipes/pkg.yaml:7")
    assert info.value.where == "recipes/pkg.yaml:7"
