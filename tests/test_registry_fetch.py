"""`marble fetch` trusts the registry with who may register, not with the bytes or names it returns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from marble.configio import load_config
from marble.errors import RegistryError
from marble.registry import register as register_module
from marble.registry.base import TAG_SHA, RegisteredVersion, adapter_sha256
from marble.registry.register import ADAPTER_FILE, fetch_adapter

REPO = Path(__file__).resolve().parents[1]


class ServedRegistry:
    """A registry whose champion is `version`, served from the directory `source` (as a server would:
    whatever it holds is what the client downloads)."""

    def __init__(self, version: RegisteredVersion, source: Path):
        self.version, self.source = version, source

    def get_alias(self, alias):
        return self.version if alias == "champion" else None

    def download(self, version, dst):
        shutil.copytree(self.source, Path(dst) / "adapter", symlinks=True, dirs_exist_ok=True)
        return Path(dst)


def serve(monkeypatch, tmp_path, *, name="3", tag=None, weights=b"lora", link_to=None) -> Path:
    source = tmp_path / "served"
    source.mkdir()
    if link_to is not None:
        (source / ADAPTER_FILE).symlink_to(link_to)
    else:
        (source / ADAPTER_FILE).write_bytes(weights)
    sha = adapter_sha256(source) if tag is None else tag
    version = RegisteredVersion(
        name="marble-lora", version=name, source="s", tags={TAG_SHA: sha} if sha else {}
    )
    monkeypatch.setattr(register_module, "open_registry", lambda cfg, d: ServedRegistry(version, source))
    return source


@pytest.fixture
def cfg():
    return load_config(REPO / "configs" / "tiny.yaml")


def test_a_verified_adapter_is_published_under_a_name_the_server_does_not_choose(cfg, tmp_path, monkeypatch):
    serve(monkeypatch, tmp_path, name="../../../escape")
    path, version = fetch_adapter(cfg, tmp_path / "reg")
    assert path.resolve().is_relative_to((tmp_path / "reg" / "fetched").resolve())
    assert (path / ADAPTER_FILE).read_bytes() == b"lora"
    assert not (tmp_path / "escape").exists() and version.version == "../../../escape"


@pytest.mark.parametrize("tag", ["", "not-a-hash"])
def test_an_adapter_without_a_valid_hash_tag_is_not_fetched(cfg, tmp_path, monkeypatch, tag):
    serve(monkeypatch, tmp_path, tag=tag)
    with pytest.raises(RegistryError, match="cannot be verified"):
        fetch_adapter(cfg, tmp_path / "reg", dst=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tampered_download_leaves_nothing_behind(cfg, tmp_path, monkeypatch):
    serve(monkeypatch, tmp_path, tag="0" * 64)
    with pytest.raises(RegistryError, match="!= registered"):
        fetch_adapter(cfg, tmp_path / "reg", dst=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging leftovers


def test_a_link_in_the_download_is_refused(cfg, tmp_path, monkeypatch):
    secret = tmp_path / "secret" / ADAPTER_FILE
    secret.parent.mkdir()
    secret.write_bytes(b"lora")  # the registered hash matches the target: only the link gives it away
    serve(monkeypatch, tmp_path, tag=adapter_sha256(secret.parent), link_to=secret)
    with pytest.raises(RegistryError, match="links"):
        fetch_adapter(cfg, tmp_path / "reg", dst=tmp_path / "out")
    assert not (tmp_path / "out").exists()
