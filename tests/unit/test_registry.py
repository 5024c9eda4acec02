from pathlib import Path

import pytest

from pipelines.registry import RegistryError, load_registry


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.yaml"
    p.write_text(text)
    return p


def test_shipped_registry_has_the_five_demo_models(registry):
    assert {m.id for m in registry} == {
        "demo-sd15",
        "demo-sdxl",
        "demo-flux",
        "demo-qwen-image",
        "demo-qwen-image-edit",
    }
    assert registry.default_model == "demo-sd15"


def test_resolve_by_id_alias_title_stem_and_hash(registry):
    sd = registry.get("demo-sd15")
    for name in [
        "demo-sd15",
        "DEMO-SD15",
        sd.title,
        sd.short_hash,
        "Realistic_Vision_V5.1.safetensors",
        "Realistic_Vision_V5.1",
        "Realistic_Vision_V5.1.safetensors [0123456789]",
    ]:
        assert registry.resolve(name) is sd, name
    assert registry.resolve("nope.safetensors") is None
    assert registry.resolve("") is None


def test_unknown_key_names_file_model_and_field(tmp_path):
    p = write(tmp_path, "models:\n  m1:\n    family: sd15\n    source: demo:sd15\n    colour: red\n")
    with pytest.raises(RegistryError) as e:
        load_registry(p)
    msg = str(e.value)
    assert str(p) in msg and "'m1'" in msg and "colour" in msg


@pytest.mark.parametrize(
    "entry, field",
    [
        ("family: sd3\n    source: x", "family"),
        ("family: sd15\n    source: demo:sd15\n    dtype: float8", "dtype"),
        ("family: sd15\n    source: demo:sd15\n    device: gpu7", "device"),
        ("family: sd15\n    source: demo:sd15\n    defaults: {steps: 0}", "defaults.steps"),
        ("family: sd15", "source"),
    ],
)
def test_bad_values_name_the_field(tmp_path, entry, field):
    p = write(tmp_path, f"models:\n  m1:\n    {entry}\n")
    with pytest.raises(RegistryError, match=f"model 'm1': field '{field}'"):
        load_registry(p)


def test_relative_sources_resolve_against_the_file(tmp_path):
    p = write(tmp_path, "models:\n  m1:\n    family: sd15\n    source: weights/sd\n")
    assert load_registry(p).get("m1").source == str(tmp_path / "weights" / "sd")


def test_unknown_default_model_and_bad_yaml(tmp_path):
    p = write(tmp_path, "default_model: x\nmodels:\n  m1:\n    family: sd15\n    source: demo:sd15\n")
    with pytest.raises(RegistryError, match="default_model"):
        load_registry(p)
    with pytest.raises(RegistryError, match="invalid YAML"):
        load_registry(write(tmp_path, "models: [\n"))
    with pytest.raises(RegistryError, match="not found"):
        load_registry(tmp_path / "missing.yaml")


def test_routes_map_gateway_routes_to_models(registry, tmp_path):
    assert registry.route_model("flux").id == "demo-flux"
    assert registry.route_model("qwen-edit").id == "demo-qwen-image-edit"
    base = "models:\n  m1:\n    family: sd15\n    source: demo:sd15\n"
    assert load_registry(write(tmp_path, base)).route_model("flux") is None
    with pytest.raises(RegistryError, match="routes.dalle"):
        load_registry(write(tmp_path, base + "routes:\n  dalle: m1\n"))
    with pytest.raises(RegistryError, match="routes.flux.*unknown model 'm2'"):
        load_registry(write(tmp_path, base + "routes:\n  flux: m2\n"))
