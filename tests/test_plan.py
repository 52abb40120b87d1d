"""The pure planner: each reason, in order of precedence."""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import sha256_file
from pipeline.errors import ManifestError
from pipeline.handoff import FileRecord
from pipeline.driver.plan import RecordedOutputs, decide


def _recorded(tmp_path: Path, fp: str = "sha256:a") -> RecordedOutputs:
    out = tmp_path / "masks" / "000.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"mask")
    return RecordedOutputs(fp, (FileRecord(path="masks/000.png", sha256=sha256_file(out), size=-1),))


def test_up_to_date_is_skipped(tmp_path: Path) -> None:
    d = decide("segment", run_dir=tmp_path, fingerprint="sha256:a", recorded=_recorded(tmp_path), forced=False)
    assert (d.action, d.reason) == ("skip", "up to date")


def test_reasons_in_order(tmp_path: Path) -> None:
    rec = _recorded(tmp_path)
    assert decide("segment", run_dir=tmp_path, fingerprint="sha256:a", recorded=rec, forced=True).reason == "forced"
    up = decide("reconstruct", run_dir=tmp_path, fingerprint=None, recorded=rec, forced=False, upstream_runs="segment")
    assert up.reason == "upstream 'segment' runs"
    assert decide("segment", run_dir=tmp_path, fingerprint="sha256:a", recorded=None, forced=False).reason == "no previous output"
    bad = ManifestError(tmp_path / "m.json", "schema_version 9 is not supported")
    assert "schema_version 9" in decide("segment", run_dir=tmp_path, fingerprint="x", recorded=bad, forced=False).reason
    changed = decide("segment", run_dir=tmp_path, fingerprint="sha256:b", recorded=rec, forced=False)
    assert changed.reason == "inputs, config or code changed"


def test_modified_and_missing_outputs(tmp_path: Path) -> None:
    rec = _recorded(tmp_path)
    (tmp_path / "masks" / "000.png").write_bytes(b"edited")
    assert decide("segment", run_dir=tmp_path, fingerprint="sha256:a", recorded=rec, forced=False).reason == "masks/000.png was modified"
    (tmp_path / "masks" / "000.png").unlink()
    assert decide("segment", run_dir=tmp_path, fingerprint="sha256:a", recorded=rec, forced=False).reason == "masks/000.png is missing"
