"""download.source: local — index a DICOM tree of any layout, link series, same verification."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from test_download import MATRIX, by_uid, cohort_row, settings

from idc_diffusion.download import local_source
from idc_diffusion.download.shard import download_shard
from idc_diffusion.download.synthetic import write_synthetic_series

A, B, C = cohort_row("31", "CT", 3), cohort_row("32", "MR", 2), cohort_row("33", "CT", 2)
ABSENT = cohort_row("34", "CT", 2)


def make_tree(root: Path) -> dict[str, list[Path]]:
    """A and B scattered over nested folders with odd names, a stray non-DICOM file and a
    duplicate copy of one of A's files elsewhere in the tree."""
    files = {}
    for row, where in ((A, "site 1/patient-x/study"), (B, "flat")):
        files[row["SeriesInstanceUID"]] = write_synthetic_series(row, root / where, matrix=MATRIX)
    (root / "flat" / "README.txt").write_text("not DICOM")
    (root / "copies").mkdir()
    shutil.copy(files[A["SeriesInstanceUID"]][0], root / "copies" / "dup")
    return files


def local(root: Path, **extra) -> dict:
    return settings(source="local", local_root=str(root), **extra)


def test_local_series_are_linked_and_verified(tmp_path):
    root = tmp_path / "tree"
    files = make_tree(root)
    shard_dir = tmp_path / "dicom" / "shard-0"
    rows = pd.DataFrame([A, B, ABSENT])
    report = download_shard(rows, 0, shard_dir, tmp_path / "dicom" / "shard-0.json", local(root))
    entries = by_uid(report)
    assert report["source"] == "local"
    assert [entries[r["SeriesInstanceUID"]]["status"] for r in (A, B, ABSENT)] == [
        "ok", "ok", "missing",
    ]  # fmt: skip
    assert "no DICOM file of this series under" in entries[ABSENT["SeriesInstanceUID"]]["reason"]
    for row in (A, B):
        uid = row["SeriesInstanceUID"]
        linked = sorted((shard_dir / uid).iterdir())
        assert len(linked) == row["instanceCount"]  # the duplicate copy is not counted twice
        assert entries[uid]["bytes"] == sum(p.stat().st_size for p in files[uid])
        assert all(p.stat().st_nlink == 2 for p in linked)  # hard links, no copies
        assert sorted(p.read_bytes() for p in linked) == sorted(p.read_bytes() for p in files[uid])
        assert all(p.name.startswith(uid[:10]) and p.suffix == ".dcm" for p in linked)
    index = pd.read_parquet(tmp_path / "dicom" / "local_index.parquet")
    assert len(index) == 3 + 2 + 1 + 1  # every regular file, DICOM or not
    assert index["SeriesInstanceUID"].isna().sum() == 1  # README.txt


def test_index_is_cached_and_refreshed_when_the_tree_changes(tmp_path):
    root, cache = tmp_path / "tree", tmp_path / "local_index.parquet"
    make_tree(root)
    first = local_source.local_index(root, cache)
    files = local_source.scan_tree(root.resolve())
    again, read = local_source.update_index(files, local_source.load_cache(cache))
    assert read == 0 and again.equals(first)  # nothing changed: no header read

    write_synthetic_series(C, root / "later", matrix=MATRIX)  # a new series arrives
    (root / "flat" / "README.txt").unlink()
    files = local_source.scan_tree(root.resolve())
    updated, read = local_source.update_index(files, local_source.load_cache(cache))
    assert read == 2  # only the two new files were opened
    assert set(updated["SeriesInstanceUID"].dropna()) == {
        A["SeriesInstanceUID"], B["SeriesInstanceUID"], C["SeriesInstanceUID"]
    }  # fmt: skip
    assert not updated["path"].str.endswith("README.txt").any()

    report = download_shard(pd.DataFrame([C]), 0, tmp_path / "shard-0", tmp_path / "r.json",
                            local(root))  # fmt: skip
    assert report["counts"]["ok"] == 1
    assert len(pd.read_parquet(tmp_path / "local_index.parquet")) == len(updated)


def test_local_copies_across_filesystems_and_catches_damage(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) for the copy fallback")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        files = make_tree(root)
        victim = files[B["SeriesInstanceUID"]][1]
        victim.write_bytes(victim.read_bytes()[:-50])  # a damaged local copy
        shard_dir = tmp_path / "shard-0"
        report = download_shard(
            pd.DataFrame([A, B]), 0, shard_dir, tmp_path / "r.json", local(root)
        )
        entries = by_uid(report)
        assert entries[A["SeriesInstanceUID"]]["status"] == "ok"
        assert entries[B["SeriesInstanceUID"]]["status"] == "corrupt"
        assert "truncated" in entries[B["SeriesInstanceUID"]]["reason"]
        copied = next((shard_dir / A["SeriesInstanceUID"]).iterdir())
        assert copied.stat().st_nlink == 1  # copied, not linked across devices
        assert not (shard_dir / B["SeriesInstanceUID"]).exists()
    finally:
        shutil.rmtree(root)


def test_local_needs_a_root(tmp_path):
    with pytest.raises(ValueError, match="local_root"):
        download_shard(pd.DataFrame([A]), 0, tmp_path / "s", tmp_path / "r.json",
                       settings(source="local"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        download_shard(pd.DataFrame([A]), 0, tmp_path / "s", tmp_path / "r.json",
                       local(tmp_path / "nowhere"))  # fmt: skip
