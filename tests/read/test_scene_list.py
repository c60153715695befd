from __future__ import annotations

import numpy as np
import pytest

from sitfuse_byol.errors import InputError
from sitfuse_byol.read import open_scene, resolve_scene_list
from sitfuse_byol.read.multifile import MultiFileSpec
from tests.conftest import write_tif


@pytest.fixture
def three_tifs(tmp_path):
    for name in ("a", "b", "c"):
        write_tif(tmp_path / f"{name}.tif", np.ones((2, 16, 16), np.uint8))
    return tmp_path


def test_text_list_with_comments(three_tifs):
    listing = three_tifs / "scenes.txt"
    listing.write_text("# my scenes\na.tif\n\nc.tif  # the last one\n")
    refs = resolve_scene_list("scenes.txt", base=three_tifs)
    assert [r.id for r in refs] == ["a", "c"]
    assert refs[1].entry.endswith("scenes.txt:4")


def test_text_list_saved_with_a_byte_order_mark(three_tifs):
    (three_tifs / "scenes.txt").write_bytes("a.tif\r\nb.tif\r\n".encode("utf-8-sig"))
    refs = resolve_scene_list("scenes.txt", base=three_tifs)
    assert [r.id for r in refs] == ["a", "b"]


def test_glob_and_yaml_list(three_tifs):
    assert [r.id for r in resolve_scene_list("*.tif", base=three_tifs)] == ["a", "b", "c"]
    (three_tifs / "list.yaml").write_text("- b.tif\n- {id: multi, bands: [a.tif, c.tif]}\n")
    refs = resolve_scene_list("list.yaml", base=three_tifs)
    assert refs[0].id == "b"
    assert isinstance(refs[1].spec, MultiFileSpec) and refs[1].id == "multi"


def test_list_entries_may_be_globs(three_tifs):
    refs = resolve_scene_list(["c.tif", "[ab].tif"], base=three_tifs)
    assert [r.id for r in refs] == ["c", "a", "b"]
    with pytest.raises(InputError) as err:
        resolve_scene_list(["c.tif", "*.zarr"], base=three_tifs)
    assert err.value.what == "glob matches no file" and err.value.where == "data.scenes[2]: *.zarr"


def test_bad_entry_is_named(three_tifs):
    (three_tifs / "scenes.txt").write_text("a.tif\nmissing.tif\n")
    refs = resolve_scene_list("scenes.txt", base=three_tifs)
    open_scene(refs[0])
    with pytest.raises(InputError) as err:
        open_scene(refs[1])
    assert "scenes.txt:2" in str(err.value) and "file not found" in str(err.value)


def test_duplicate_ids_and_empty_glob(three_tifs):
    with pytest.raises(InputError, match="share the id 'a'"):
        resolve_scene_list(["a.tif", "a.tif"], base=three_tifs)
    with pytest.raises(InputError, match="glob matches no file"):
        resolve_scene_list("*.zarr", base=three_tifs)


def test_malformed_yaml_list_is_an_input_error_naming_the_file(three_tifs):
    (three_tifs / "list.yaml").write_text("- a.tif\n- [b.tif\n")
    with pytest.raises(InputError, match="invalid YAML") as err:
        resolve_scene_list("list.yaml", base=three_tifs)
    assert err.value.where == str(three_tifs / "list.yaml")


def test_yaml_holding_one_multifile_scene(three_tifs):
    (three_tifs / "scene.yaml").write_text("{id: multi, bands: [a.tif, c.tif], reference: c}\n")
    (ref,) = resolve_scene_list("scene.yaml", base=three_tifs)
    assert isinstance(ref.spec, MultiFileSpec)
    assert ref.id == "multi" and ref.entry == "scene.yaml"
    assert ref.spec.files == (three_tifs / "a.tif", three_tifs / "c.tif")
    assert ref.spec.reference == 1


def test_scene_ids_must_be_plain_file_names(three_tifs):
    (three_tifs / "list.yaml").write_text("- {id: ../evil, bands: [a.tif]}\n")
    with pytest.raises(InputError) as err:
        resolve_scene_list("list.yaml", base=three_tifs)
    assert err.value.what.startswith("scene id '../evil' cannot name output files")
    assert err.value.where == f"{three_tifs / 'list.yaml'}[1]"


def test_literal_names_with_glob_or_comment_characters(three_tifs):
    write_tif(three_tifs / "sc[2].tif", np.ones((2, 16, 16), np.uint8))
    write_tif(three_tifs / "sc#3.tif", np.ones((2, 16, 16), np.uint8))
    assert [r.id for r in resolve_scene_list(str(three_tifs / "sc[2].tif"), base=three_tifs)] == ["sc[2]"]
    (three_tifs / "scenes.txt").write_text("sc#3.tif\n#a.tif\nb.tif #comment\n")
    assert [r.id for r in resolve_scene_list("scenes.txt", base=three_tifs)] == ["sc#3", "b"]


def test_a_scene_list_that_is_not_utf8_text(three_tifs):
    (three_tifs / "scenes.txt").write_bytes(b"a.tif\n\xff\xfe\x00binary\n")
    with pytest.raises(InputError) as err:
        resolve_scene_list("scenes.txt", base=three_tifs)
    assert str(err.value) == f"not UTF-8 text ({three_tifs / 'scenes.txt'})"
    (three_tifs / "scene.yaml").write_bytes(b"\xff\xfe{id: x}")
    with pytest.raises(InputError, match="not UTF-8 text"):
        resolve_scene_list("scene.yaml", base=three_tifs)
