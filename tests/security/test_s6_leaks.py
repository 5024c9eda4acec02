"""S6: error answers never carry filesystem paths, tracebacks or secrets; /sdapi/v1/cmd-flags, /options and the
probes never show a credential.

Internal errors are forced for real: a handler that raises with a path and a password in its message, jobs that
fail with OS errors naming files, models whose folder or file is missing (through the real engine).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from pipelines.errors import GenerationFailed
from pipelines.registry import ModelSpec, Registry, load_registry
from server.app import create_app
from server.errors import client_safe
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine

SECRET = "hunter2-s3cr3t-value"
TRACEBACK = re.compile(r"Traceback|File \"|line \d+, in |0x[0-9a-f]{8,}")


def assert_clean(text: str, *paths: Path) -> None:
    assert not TRACEBACK.search(text), text
    assert SECRET not in text, text
    for path in paths:
        assert str(path) not in text, text
        assert str(path.resolve()) not in text, text


@pytest.fixture
def registry() -> Registry:
    return load_registry(REPO_ROOT / "models.yaml")


def test_an_exception_in_a_handler_says_nothing_about_the_server(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine(registry)

    def broken() -> dict:
        raise RuntimeError(f"cannot read {tmp_path}/secrets/db.conf (password={SECRET})")

    monkeypatch.setattr(engine, "memory_stats", broken)
    with TestClient(
        create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry), raise_server_exceptions=False
    ) as client:
        r = client.get("/sdapi/v1/memory")
        assert r.status_code == 500 and "RuntimeError" in r.text
        assert_clean(r.text, tmp_path)

        from server.api.gateway import adapter

        def broken_plan(*args: object) -> None:
            raise KeyError(f"{tmp_path}/models/unet password={SECRET}")

        monkeypatch.setattr(adapter, "qwen", broken_plan)
        r = client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert_clean(r.text, tmp_path)


def test_jobs_failing_with_os_errors_say_nothing_about_the_server(registry: Registry, tmp_path: Path) -> None:
    engine = FakeEngine(registry)
    engine.fail_with = FileNotFoundError(2, "No such file or directory", f"{tmp_path}/weights/{SECRET}.bin")
    with TestClient(
        create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry), raise_server_exceptions=False
    ) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 500
        assert_clean(r.text, tmp_path)

        r = client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64"})
        assert r.status_code == 500
        assert_clean(r.text, tmp_path)

        r = client.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "64x64", "async": True})
        task = client.get(r.json()["poll_url"])
        for _ in range(200):
            if task.json()["status"] == "failed":
                break
            task = client.get(r.json()["poll_url"])
        assert task.json()["status"] == "failed"
        assert_clean(task.text, tmp_path)  # the stored error, served to whoever polls


def test_engine_errors_name_the_model_not_where_its_files_are(registry: Registry, tmp_path: Path) -> None:
    """The real engine wraps unexpected pipeline errors as `generation failed: <type>: <message>`."""
    engine = FakeEngine(registry)
    engine.fail_with = GenerationFailed(
        f"generation failed: FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path}/vae/config.json'"
    )
    with TestClient(
        create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry), raise_server_exceptions=False
    ) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
        assert r.status_code == 500 and "config.json" in r.text  # which file, still
        assert_clean(r.text, tmp_path)


def test_models_that_fail_to_load_are_named_without_their_paths(tmp_path: Path) -> None:
    """Through the real engine: a folder that is gone, a single file that is gone, a folder of pickles."""
    from pipelines.engine import Engine, EngineConfig

    models_dir = tmp_path / "models"
    pickled = models_dir / "pickled"
    (pickled / "unet").mkdir(parents=True)
    (pickled / "model_index.json").write_text("{}")
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    registry = Registry(
        [
            ModelSpec(id="gone", family="sd15", source=str(models_dir / "gone")),
            ModelSpec(id="gone-file", family="sd15", source=str(models_dir / "gone.safetensors")),
            ModelSpec(id="pickled", family="sd15", source=str(pickled)),
        ],
        default_model="gone",
    )
    engine = Engine(registry, EngineConfig(data_dir=tmp_path / "data", device="cpu", preload_default=False))
    engine.start()
    try:
        with TestClient(
            create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry), raise_server_exceptions=False
        ) as client:
            for model in ("gone", "gone-file", "pickled"):
                r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model})
                assert r.status_code == 500 and f"'{model}'" in r.text, r.text
                assert_clean(r.text, tmp_path)
    finally:
        engine.stop()


def test_client_safe_keeps_the_file_name_and_drops_where_it_is() -> None:
    assert client_safe("source /srv/easel/models/sd15 is missing") == "source sd15 is missing"
    assert client_safe("No such file: '/data/x/vae/config.json'") == "No such file: 'config.json'"
    assert client_safe("see https://example.com/a/b and model 'x/y'") == "see https://example.com/a/b and model 'x/y'"
    assert client_safe("size 64/32, ratio 16:9") == "size 64/32, ratio 16:9"


# Credentials ---------------------------------------------------------------------------------------------------------


def secret_settings(base: Settings) -> Settings:
    """`base` with every SecretStr setting (database password, A1111 api_auth, future keys) holding SECRET."""
    secrets = {
        name: SecretStr(f"postgresql+psycopg://easel:{SECRET}@db/easel" if name == "database_url" else SECRET)
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    assert "database_url" in secrets
    return base.model_copy(update=secrets)


def test_cmd_flags_options_and_probes_show_no_credentials(registry: Registry, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_auth=f"admin:{SECRET}"), engine=FakeEngine(registry),
                     registry=registry)  # fmt: skip
    basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{SECRET}".encode()).decode()}
    with TestClient(app) as client:
        app.state.settings = secret_settings(app.state.settings)
        r = client.post(
            "/sdapi/v1/options", headers=basic, json={"api_key": SECRET, "hf_token": SECRET, "db_password": SECRET}
        )
        assert r.status_code == 200
        for path in ("/sdapi/v1/cmd-flags", "/sdapi/v1/options", "/readyz", "/livez", "/openapi.json"):
            r = client.get(path, headers=basic)
            assert r.status_code == 200, (path, r.text)
            assert SECRET not in r.text, path
        flags = client.get("/sdapi/v1/cmd-flags", headers=basic).json()
        assert flags["port"] == app.state.settings.port  # the flags are there, only the secrets are not
        r = client.get(
            "/sdapi/v1/cmd-flags", headers={"Authorization": "Basic " + base64.b64encode(b"admin:no").decode()}
        )
        assert r.status_code == 401 and SECRET not in r.text
