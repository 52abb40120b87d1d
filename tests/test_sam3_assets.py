"""SAM3 backend logic that needs no torch: device parsing, BPE location, checkpoint resolution, hub errors.

Hub failures are simulated with fake exception classes named like huggingface_hub's (the mapping reads
class names and ``response.status_code``), so these tests need neither the hub client nor a network.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.backends import sam3_assets
from pipeline.backends.sam3_assets import (
    BPE_NAME,
    hub_error,
    is_local_checkpoint,
    locate_bpe,
    parse_device,
    resolve_checkpoint,
)
from pipeline.errors import BackendError

# ------------------------------------------------------------------------------------------ device


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("auto", 0, "cpu"),
        ("auto", 2, "cuda:0"),
        ("cpu", 4, "cpu"),
        ("CPU", 0, "cpu"),
        ("cuda", 1, "cuda:0"),
        ("cuda:0", 1, "cuda:0"),
        ("cuda:3", 4, "cuda:3"),
        (" cuda:1 ", 2, "cuda:1"),
    ],
)
def test_parse_device(spec, count, expected):
    assert parse_device(spec, count) == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", "cuda:0:1", ""])
def test_parse_device_rejects_non_devices(spec):
    with pytest.raises(BackendError, match="not a device") as info:
        parse_device(spec, 2)
    assert "cuda:N" in info.value.hint


def test_parse_device_index_out_of_range_names_the_visible_gpus():
    with pytest.raises(BackendError, match=r"only 2 GPU\(s\).*cuda:0\.\.cuda:1"):
        parse_device("cuda:2", 2)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_parse_device_cuda_without_gpu_suggests_cpu(spec):
    with pytest.raises(BackendError, match="no CUDA GPU") as info:
        parse_device(spec, 0)
    assert "segment.device=cpu" in info.value.hint


# ------------------------------------------------------------------------------------------ BPE vocab


@pytest.fixture
def fake_vocab(tmp_path, monkeypatch) -> bytes:
    """A stand-in vocab whose sha256 the module is told to expect."""
    content = gzip.compress(b"\"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h\n")
    monkeypatch.setattr(sam3_assets, "BPE_SHA256", hashlib.sha256(content).hexdigest())
    return content


def _fake_package(root: Path, name: str, vocab: bytes | None) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package is not allowed in this test')\n")
    if vocab is not None:
        (pkg / BPE_NAME).write_bytes(vocab)


def test_locate_bpe_finds_the_packaged_copy_without_importing_it(tmp_path, monkeypatch, fake_vocab):
    _fake_package(tmp_path, "fake_clip_pkg", fake_vocab)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = locate_bpe(None, package="fake_clip_pkg")
    assert path == tmp_path / "fake_clip_pkg" / BPE_NAME
    assert "fake_clip_pkg" not in sys.modules


def test_locate_bpe_package_without_the_file(tmp_path, monkeypatch, fake_vocab):
    _fake_package(tmp_path, "fake_empty_pkg", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendError, match="was not found") as info:
        locate_bpe(None, package="fake_empty_pkg")
    assert "envs/sam3.yml" in info.value.hint and "bpe_path" in info.value.hint


def test_locate_bpe_missing_package():
    with pytest.raises(BackendError, match="not installed"):
        locate_bpe(None, package="no_such_package_for_sure_xyz")


def test_locate_bpe_override_wins_and_is_checked(tmp_path, fake_vocab):
    override = tmp_path / "vocab.txt.gz"
    override.write_bytes(fake_vocab)
    assert locate_bpe(override, package="no_such_package_for_sure_xyz") == override


def test_locate_bpe_override_missing(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        locate_bpe(tmp_path / "nope.gz")


def test_locate_bpe_wrong_content_is_refused(tmp_path, fake_vocab):
    wrong = tmp_path / "vocab.txt.gz"
    wrong.write_bytes(b"not the vocab")
    with pytest.raises(BackendError, match="not the CLIP BPE vocab"):
        locate_bpe(wrong)


def test_default_sha256_is_the_real_clip_vocab():
    assert sam3_assets.BPE_SHA256 == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


# ------------------------------------------------------------------------------------------ hub errors


class HfHubHTTPError(OSError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.response = SimpleNamespace(status_code=status)


class RepositoryNotFoundError(HfHubHTTPError):
    pass


class GatedRepoError(RepositoryNotFoundError):
    pass


class LocalEntryNotFoundError(FileNotFoundError):
    pass


def test_gated_repo_says_accept_licence_and_set_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    err = hub_error(GatedRepoError("Access to model facebook/sam3 is restricted", 401), repo="facebook/sam3",
                    filename="sam3.pt")
    assert "gated" in err.message and "HTTP 401" in err.message and "no HF_TOKEN" in err.message
    assert "HF_TOKEN" in err.hint and "huggingface.co/facebook/sam3" in err.hint and "segment.sam3.checkpoint" in err.hint


@pytest.mark.parametrize("status", [401, 403])
def test_plain_401_403_are_gated_too(status, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    err = hub_error(HfHubHTTPError("Forbidden", status), repo="facebook/sam3", filename="sam3.pt")
    assert f"HTTP {status}" in err.message and "HF_TOKEN is set" in err.message
    assert "accept the licence" in err.hint


def test_consistency_check_names_the_cache_files_and_redownload(tmp_path):
    exc = OSError(
        "Consistency check failed: file should be of size 3450062241 but has size 12 (sam3.pt).\n"
        "This is usually due to network issues while downloading the file. Please retry with `force_download=True`."
    )
    err = hub_error(exc, repo="facebook/sam3", filename="sam3.pt", cache_dir=tmp_path)
    assert "corrupt" in err.message and "\n" not in err.message
    assert str(tmp_path / "models--facebook--sam3") in err.hint
    assert "*.incomplete" in err.hint and "--redownload" in err.hint and "segment.sam3.redownload" in err.hint


def test_not_found_and_offline_and_other_errors():
    err = hub_error(RepositoryNotFoundError("404 Client Error", 404), repo="me/nothing", filename="sam3.pt")
    assert "not found" in err.message and "segment.sam3.checkpoint" in err.hint
    err = hub_error(LocalEntryNotFoundError("cannot find"), repo="facebook/sam3", filename="sam3.pt")
    assert "not in the HF cache" in err.message and "HF_ENDPOINT" in err.hint
    err = hub_error(ConnectionError("boom\nsecond line"), repo="facebook/sam3", filename="sam3.pt")
    assert "ConnectionError: boom" in err.message and "\n" not in err.message


def test_hf_endpoint_is_named_in_errors(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    err = hub_error(RepositoryNotFoundError("404", 404), repo="facebook/sam3", filename="sam3.pt")
    assert "https://mirror.example" in err.message


# ------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize(
    ("value", "local"),
    [("facebook/sam3", False), ("me/sam3-finetune", False), ("/ckpt/sam3.pt", True), ("./sam3.pt", True),
     ("~/models/x", True), ("weights/sam3.pt", True), ("weights/model.pth", True)],
)
def test_is_local_checkpoint(value, local):
    assert is_local_checkpoint(value) is local


def test_resolve_local_checkpoint(tmp_path):
    ckpt = tmp_path / "sam3.pt"
    ckpt.write_bytes(b"x")
    assert resolve_checkpoint(str(ckpt)) == (ckpt, False)
    with pytest.raises(BackendError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing.pt"))


def test_resolve_repo_id_downloads_sam3_pt_with_revision_and_redownload(tmp_path):
    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path / "sam3.pt")

    path, from_hub = resolve_checkpoint("facebook/sam3", revision="abc123", redownload=True, download=download)
    assert (path, from_hub) == (tmp_path / "sam3.pt", True)
    assert calls == [{"repo_id": "facebook/sam3", "filename": "sam3.pt", "revision": "abc123", "force_download": True}]


def test_resolve_repo_id_maps_hub_failures_to_backend_errors():
    def download(**kwargs):
        raise GatedRepoError("restricted", 403)

    with pytest.raises(BackendError, match="gated") as info:
        resolve_checkpoint("facebook/sam3", download=download)
    assert isinstance(info.value.__cause__, GatedRepoError)


def test_checkpoint_load_error_hints(tmp_path):
    err = sam3_assets.checkpoint_load_error(RuntimeError("PytorchStreamReader failed reading zip archive"),
                                            tmp_path / "sam3.pt", from_hub=True)
    assert "cannot be loaded" in err.message and "--redownload" in err.hint
    err = sam3_assets.checkpoint_load_error(EOFError(), tmp_path / "sam3.pt", from_hub=False)
    assert "re-copy" in err.hint


def test_backend_module_imports_without_torch():
    # the package must import with only the light deps; torch is imported inside Sam3Segmenter
    import importlib

    module = importlib.import_module("pipeline.backends.sam3")
    assert issubclass(module.Sam3Segmenter, importlib.import_module("pipeline.backends.base").Segmenter)
