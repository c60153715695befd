from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from sitfuse_byol.config import SCHEMA, load_config, reference_markdown
from sitfuse_byol.errors import ConfigError


def write(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_defaults_are_filled_and_paths_are_relative_to_the_config(tmp_path):
    config = load_config(write(tmp_path, {"data": {"scenes": ["a.tif"]}, "output": {"dir": "out"}}))
    assert config["train"]["epochs"] == SCHEMA["train"]["epochs"].default
    assert config["tiling"]["patch_size"] == SCHEMA["tiling"]["patch_size"].default
    assert config.output_dir == tmp_path.resolve() / "out"


def test_overrides_are_typed_as_yaml(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    config = load_config(
        path, overrides=["train.epochs=3", "data.bands=[1, B4]", "train.lr=5e-4", "data.nodata=null"]
    )
    assert config["train"]["epochs"] == 3
    assert config["data"]["bands"] == [1, "B4"]
    assert config["train"]["lr"] == pytest.approx(5e-4)
    assert config["data"]["nodata"] is None


def test_exponent_floats_are_numbers_at_any_depth(tmp_path):
    # YAML 1.1 reads 5e-2 (no dot, no exponent sign) as a string; the loader must not,
    # neither inside a mapping value nor in a list, from a file or from --set.
    path = tmp_path / "config.yaml"
    path.write_text(
        "data:\n  scenes: [a.tif]\n  valid_range: [0, 1e4]\ntrain:\n  augment: {band_gain: 5e-2}\n"
    )
    config = load_config(path)
    assert config["train"]["augment"] == {"band_gain": pytest.approx(0.05)}
    assert config["data"]["valid_range"] == [0, 10000.0]
    overridden = load_config(
        write(tmp_path, {"data": {"scenes": ["a.tif"]}}),
        overrides=["train.augment={band_gain: 5e-2}", "train.weight_decay=1e-5"],
    )
    assert overridden["train"]["augment"] == {"band_gain": pytest.approx(0.05)}
    assert overridden["train"]["weight_decay"] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"data": {}}, "config: data.scenes: required key is missing"),
        ({"data": {"scenes": ["a"]}, "trian": {}}, "config: trian: unknown key; did you mean 'train'?"),
        ({"data": {"scenes": ["a"]}, "train": {"batch_size": 1}}, "config: train.batch_size"),
        ({"data": {"scenes": ["a"]}, "train": {"device": "gpu"}}, "must be one of auto, cpu, cuda"),
        ({"data": {"scenes": ["a"]}, "train": {"compile": "yes"}}, "must be true or false"),
        ({"data": {"scenes": ["a"], "valid_range": [5, 1]}}, "min must not exceed max"),
        ({"data": {"scenes": ["a"], "bands": [0.5]}}, "band indices"),
        ({"data": {"scenes": ["a"]}, "cluster": {"n_clusters": 1}}, "cluster.n_clusters"),
        ({"data": {"scenes": ["a"]}, "train": {"seed": 2**64}}, "train.seed: must be at most 4294967295"),
        ({"data": {"scenes": ["a"], "nodata": float("nan")}}, "NaN pixels are invalid anyway (leave it null)"),
        ({"data": {"scenes": ["a"]}, "cluster": {"seed": 2**32}}, "cluster.seed: must be at most 4294967295"),
    ],
)
def test_bad_configs_fail_with_the_key_named(tmp_path, content, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, content))
    assert message in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_unreadable_files_and_duplicate_keys_are_config_errors(tmp_path):
    twice = tmp_path / "twice.yaml"
    # A second `data:` would silently drop the first one's scenes.
    twice.write_text("data:\n  scenes: [a.tif]\ntrain:\n  epochs: 2\ndata:\n  nodata: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(twice)
    assert str(err.value) == f"config: invalid YAML at line 5: duplicate key 'data' ({twice})"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe data")
    with pytest.raises(ConfigError) as err:
        load_config(binary)
    assert str(err.value) == f"config: cannot read the file: not UTF-8 text ({binary})"
    with pytest.raises(ConfigError, match="config: cannot read the file: is a directory"):
        load_config(tmp_path)
    # Merge keys stay YAML's: a key written after a merge overrides the merged one.
    merged = tmp_path / "merged.yaml"
    merged.write_text("data:\n  scenes: [a.tif]\ntrain:\n  <<: {epochs: 3, seed: 7}\n  epochs: 5\n")
    assert (load_config(merged)["train"]["epochs"], load_config(merged)["train"]["seed"]) == (5, 7)
    odd_key = tmp_path / "odd_key.yaml"
    odd_key.write_text("data:\n  scenes: [a.tif]\n? [a]\n: 1\n")
    with pytest.raises(ConfigError, match="config: invalid YAML at line 3"):
        load_config(odd_key)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="config: train.lr: must be a finite number"):
        load_config(write(tmp_path, {"data": {"scenes": ["a"]}}), overrides=[f"train.lr={value}"])


def test_digest_changes_with_values(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    a = load_config(path)
    b = load_config(path, overrides=["train.epochs=2"])
    assert a.digest("train") != b.digest("train")
    assert a.digest("data") == b.digest("data")


def test_readme_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("\n<!-- config-reference:end -->")
    assert readme[start:end] == reference_markdown(), "run: sitfuse config reference, paste into README"


def test_example_configs_are_valid():
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    names = sorted(p.name for p in configs.glob("*.yaml"))
    assert {"demo.yaml", "landsat.yaml", "sentinel2.yaml", "hyperspectral.yaml"} <= set(names)
    for path in configs.glob("*.yaml"):
        load_config(path)


def test_digest_leaves_out_where_work_runs(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    cpu = load_config(path, overrides=["embed.device=cpu"])
    gpu = load_config(path, overrides=["embed.device=cuda"])
    assert cpu.digest("embed") == gpu.digest("embed")
    assert cpu.digest("embed") != load_config(path, overrides=["embed.window=3"]).digest("embed")
    # How training runs (the settings a resume may change too) is not what it trains.
    placed = load_config(path, overrides=["train.threads=1", "train.compile=true", "train.device=cpu"])
    assert placed.digest("train") == cpu.digest("train")
    assert placed.digest("train") != load_config(path, overrides=["train.lr=0.01"]).digest("train")


def test_digest_can_leave_out_single_keys(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    one = load_config(path)
    more = load_config(path, overrides=["data.scenes=[a.tif, b.tif]"])
    nodata = load_config(path, overrides=["data.nodata=0"])
    assert one.digest("data") != more.digest("data")
    assert one.digest("data", leave_out=["data.scenes"]) == more.digest("data", leave_out=["data.scenes"])
    assert one.digest("data", leave_out=["data.scenes"]) != nodata.digest("data", leave_out=["data.scenes"])


def test_settings_digest_is_the_same_for_another_batch_or_folder(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    one = load_config(path)
    elsewhere = load_config(path, overrides=["data.scenes=[a.tif, b.tif]", "output.dir=/tmp/other", "dask.workers=3"])
    assert one.settings_digest() == elsewhere.settings_digest()
    for change in ("cluster.n_clusters=9", "data.nodata=0", "train.lr=0.01", "output.polygons=true", "tiling.patch_size=8"):
        assert load_config(path, overrides=[change]).settings_digest() != one.settings_digest(), change


def test_the_resolved_config_means_the_same_from_another_folder(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    path = write(project / "configs", {
        "data": {"scenes": ["../scenes/a.tif", {"id": "s2", "bands": ["../s2/B02.tif", "../s2/B03.tif"]}]},
        "output": {"dir": "../outputs/run"},
    })  # fmt: skip
    config = load_config(path)
    assert config["data"]["scenes"] == [
        str(project / "scenes" / "a.tif"),
        {"id": "s2", "bands": [str(project / "s2" / "B02.tif"), str(project / "s2" / "B03.tif")]},
    ]
    assert config["output"]["dir"] == str(project / "outputs" / "run") and config.output_dir == project / "outputs" / "run"
    saved = tmp_path / "elsewhere" / "config.resolved.yaml"
    saved.parent.mkdir()
    saved.write_text(config.to_yaml())
    again = load_config(saved)
    assert again.values == config.values
    assert again.digest() == config.digest()


def test_set_reaches_into_mapping_keys_and_empty_sections(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  scenes: [a.tif]\ntrain:\n  encoder_args: {width: 16, depth: 3}\ncluster:\n")
    config = load_config(path, overrides=["train.encoder_args.width=8", "cluster.n_clusters=5", "train.augment.contrast=0.2"])
    # The other entries of the mapping stay.
    assert config["train"]["encoder_args"] == {"width": 8, "depth": 3}
    assert config["train"]["augment"] == {"contrast": pytest.approx(0.2)}
    assert config["cluster"]["n_clusters"] == 5
    with pytest.raises(ConfigError, match=r"config: train.epochs: must be a mapping to --set train.epochs.x \(got 2\)"):
        load_config(path, overrides=["train.epochs=2", "train.epochs.x=1"])
    with pytest.raises(ConfigError, match="expected section.key"):
        load_config(path, overrides=["train=1"])


@pytest.mark.parametrize("empty", ["[]", "false", "0"])
def test_a_section_that_is_not_a_mapping_is_refused(tmp_path, empty):
    path = tmp_path / "config.yaml"
    path.write_text(f"data:\n  scenes: [a.tif]\ntrain: {empty}\n")
    with pytest.raises(ConfigError, match="config: train: must be a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    ("section", "key", "other"), [("data", "unscale", "true"), ("cluster", "sample_window", "32")]
)
def test_a_key_added_later_leaves_the_keys_of_earlier_runs_alone_at_its_default(tmp_path, section, key, other):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"scenes": ["a.tif"]}}))
    default = load_config(path)
    value = SCHEMA[section][key].default
    assert default[section][key] == value
    same = yaml.safe_dump(value).splitlines()[0]
    assert load_config(path, overrides=[f"{section}.{key}={same}"]).digest(section) == default.digest(section)
    assert load_config(path, overrides=[f"{section}.{key}={other}"]).digest(section) != default.digest(section)
    # As the key was hashed before it existed.
    without = {k: v for k, v in default.values[section].items() if k != key}
    text = json.dumps({section: without}, sort_keys=True, default=str)
    assert default.digest(section) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_a_wavelength_band_name_read_as_a_number_gets_a_hint(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}})
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides=["data.bands=[400.0, 431.7]"])
    assert err.value.what == (
        "config: data.bands: must hold band indices (from 1) or names, not 400.0; quote a name that looks like a "
        "number ('400.0') (got [400.0, 431.7])"
    )
    assert load_config(path, overrides=["data.bands=['400.0', '431.7']"])["data"]["bands"] == ["400.0", "431.7"]


def test_a_folder_name_yaml_reads_as_a_number_gets_a_hint(tmp_path):
    path = write(tmp_path, {"data": {"scenes": ["a.tif"]}, "output": {"dir": 2024}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.what == "config: output.dir: must be a string; quote it: '2024' (got 2024)"
    assert load_config(path, overrides=["output.dir='2024'"]).output_dir == tmp_path / "2024"
