"""Where a run or a search keeps Ray's state in a shared --storage (rayad.layout.ray_storage)."""

from __future__ import annotations

from rayad.layout import ray_storage, same_storage, storage_path

MINIO = "s3://bucket/rayad?endpoint_override=minio:9000&scheme=http"


def test_each_folder_has_its_own_place_in_a_shared_storage_whatever_path_names_it(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    names = [tmp_path / "runs" / "a", tmp_path / "link" / "a", tmp_path / "runs" / ".." / "runs" / "a"]
    places = {ray_storage("/data/rayad/", folder, "unused") for folder in names}
    assert len(places) == 1 and places.pop().startswith("/data/rayad/a-")
    assert ray_storage("/data/rayad", tmp_path / "runs" / "b", "unused").startswith("/data/rayad/b-")
    assert ray_storage(None, tmp_path / "runs" / "a", "the run's own folder") == "the run's own folder"


def test_a_uris_query_stays_at_its_end():
    """Appended after the query, the run's folder made pyarrow read the scheme 'http/run-…'."""
    place = ray_storage(MINIO, "runs/a", "unused")
    assert place.startswith("s3://bucket/rayad/a-") and place.endswith("?endpoint_override=minio:9000&scheme=http")
    assert storage_path(place, "tune") == place.replace("?", "/tune?")
    assert storage_path("file:///tmp/x/", "trials") == "file:///tmp/x/trials"


def test_one_storage_spelled_as_a_path_or_a_file_uri_is_the_same(tmp_path, monkeypatch):
    """--resume compares the --storage a --workers run began with: file:///abs and /abs/ are one folder."""
    monkeypatch.chdir(tmp_path)
    st = tmp_path / "st"
    same = [str(st), f"{st}/", f"file://{st}", f"file://{st}/", "st"]
    assert all(same_storage(same[0], other) for other in same)
    assert not same_storage(str(tmp_path / "st"), str(tmp_path / "other"))
    assert not same_storage(None, str(tmp_path / "st")) and same_storage(None, None)
    assert same_storage("s3://bucket/runs/", "s3://bucket/runs") and not same_storage("s3://bucket/a", "gs://bucket/a")
