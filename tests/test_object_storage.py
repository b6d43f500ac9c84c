"""Object storage end to end, on a real S3 server on loopback (moto): prepare a dataset into s3://,
run a sweep whose storage is s3://, promote its best checkpoint into a registry on s3://, and read it
all back from a fresh machine's point of view (an empty local cache), the dashboard included."""
from __future__ import annotations

import pytest
from conftest import TINY_SWEEP

from crystalae import uri_fs
from crystalae.cli import main
from crystalae.dataset import read_manifest


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Point the local mirror of object storage at an empty folder (another machine, in effect)."""
    def switch(name: str):
        monkeypatch.setenv("CRYSTALAE_CACHE", str(tmp_path / name))
        return tmp_path / name
    switch("cache-a")
    return switch


def test_prepare_into_s3_is_the_local_dataset_and_resumes(s3_bucket, tmp_path, fresh_cache):
    args = ["data", "prepare", "demo:30", "--grid", "8", "--shard-size", "8", "--workers", "2"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    remote = f"{s3_bucket}/datasets/demo"
    assert main([*args, "--out", remote]) == 0
    local, published = read_manifest(tmp_path / "local"), read_manifest(remote)
    assert published["shards"] == local["shards"] and published["dataset_hash"] == local["dataset_hash"]
    # a run killed after some shards: the manifest and one shard's record are gone, the rest is kept
    uri_fs.remove_tree(f"{remote}/manifest.json")
    uri_fs.remove_tree(f"{remote}/shards/shard-00002.json")
    assert main([*args, "--out", remote]) == 0
    assert read_manifest(remote)["dataset_hash"] == local["dataset_hash"]
    assert main([*args[:3], "--grid", "12", "--out", remote]) == 2  # other settings: refused, nothing lost
    assert read_manifest(remote)["dataset_hash"] == local["dataset_hash"]


@pytest.mark.slow
def test_sweep_promote_and_dashboard_on_s3(s3_bucket, tmp_path, fresh_cache, monkeypatch, capsys):
    import ray

    from crystalae.registry import Registry
    from crystalae.search.layout import study_path
    from crystalae.search.results import collect_trials

    config = tmp_path / "s3sweep.yaml"
    single = TINY_SWEEP[:TINY_SWEEP.index("objective:")] + "objective: {metric: val_score, mode: max}\n" + \
        TINY_SWEEP[TINY_SWEEP.index("budget:"):]
    config.write_text(single.replace("name: tiny", "name: s3sweep").replace("trials: 3, epochs: 2", "trials: 2, epochs: 1"))
    sweeps, registry = f"{s3_bucket}/sweeps", f"{s3_bucket}/registry"
    try:
        assert main(["sweep", str(config), "--storage", sweeps]) == 0
    finally:
        ray.shutdown()
    stored = dict(uri_fs.list_files(f"{sweeps}/s3sweep"))
    for name in ("sweep.json", "summary.json", "optuna.db", "ray.log"):
        assert name in stored, sorted(stored)
    assert any(n.startswith("trials/") and n.endswith("/checkpoint.pt") for n in stored)
    assert any(n.startswith("datasets/") and n.endswith("/manifest.json") for n in stored)

    fresh_cache("cache-b")  # another machine: nothing local, everything read from the store
    summary = collect_trials(f"{sweeps}/s3sweep")
    assert len(summary.trials) == 2 and all(t.best_checkpoint_path for t in summary.trials)
    assert all(t.status == "finished" for t in summary.trials)
    assert study_path(f"{sweeps}/s3sweep").is_file()
    assert main(["promote", "--best", "s3sweep", "--storage", sweeps, "--registry", registry, "--alias", "champion"]) == 0
    assert "manifest.json" in dict(uri_fs.list_files(f"{registry}/s3sweep/v1"))
    trial = summary.trials[0].trial_id
    assert main(["promote", f"s3sweep/{trial}", "--storage", sweeps, "--registry", registry]) == 0  # RUN/TRIAL form
    assert "manifest.json" in dict(uri_fs.list_files(f"{registry}/s3sweep/v2"))
    assert uri_fs.read_json(f"{registry}/aliases.json") == {"champion": "s3sweep@1"}

    fresh_cache("cache-c")
    folder = Registry(registry).resolve("champion")
    assert (folder / "checkpoint.pt").is_file()
    assert main(["models", "--registry", registry]) == 0
    assert "s3sweep@1 [champion]" in capsys.readouterr().out

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from tests.test_dashboard import PAGES, TIMEOUT, assert_clean

    monkeypatch.setenv("CRYSTALAE_STORAGE", sweeps)
    monkeypatch.setenv("CRYSTALAE_REGISTRY", registry)
    home = AppTest.from_file(str(PAGES["home"]), default_timeout=TIMEOUT).run()
    assert_clean(home)
    assert list(home.dataframe[0].value["sweep"]) == ["s3sweep"]
    assert "champion" in " ".join(m.value for m in home.markdown)
    page = AppTest.from_file(str(PAGES["sweeps"]), default_timeout=TIMEOUT).run()
    assert_clean(page)
    assert len(page.get("plotly_chart")) >= 1


def test_a_source_on_s3_reads_like_the_local_one(s3_bucket, tmp_path, fresh_cache, mixed_sources):
    from crystalae.sources import list_entries

    local_csv, local_folder, _ = mixed_sources
    uri_fs.upload_file(local_csv, f"{s3_bucket}/src/mixed.csv")
    uri_fs.upload(local_folder, f"{s3_bucket}/src/folder")
    remote = [f"{s3_bucket}/src/mixed.csv", f"{s3_bucket}/src/folder"]
    assert [(e.material_id, e.text, e.duplicate_of) for e in list_entries(remote)] == \
        [(e.material_id, e.text, e.duplicate_of) for e in list_entries([local_csv, local_folder])]
    with pytest.raises(ValueError, match="does not exist"):
        list_entries(f"{s3_bucket}/src/nothing.csv")


def test_registry_on_s3_versions_aliases_and_a_second_writer(s3_bucket, tmp_path, fresh_cache, tiny_checkpoint):
    from crystalae.registry import Registry, RegistryError

    location = f"{s3_bucket}/registry"
    first = Registry(location)
    assert first.promote(tiny_checkpoint, "m", alias="champion")["ref"] == "m@1"
    assert first.promote(tiny_checkpoint, "m")["ref"] == "m@2"
    fresh_cache("cache-b")
    other = Registry(location)  # another machine: sees both versions and the alias
    assert [e["ref"] for e in other.entries()] == ["m@1", "m@2"]
    assert (other.resolve("champion") / "checkpoint.pt").is_file() and other.resolve("champion").name == "v1"
    # a writer whose view is stale picks a number another writer has published: refused, nothing changed
    fresh_cache("cache-c")
    stale = Registry(location)
    stale._refresh = lambda: None
    with pytest.raises(RegistryError, match="another writer"):
        stale.promote(tiny_checkpoint, "m")
    assert sorted(name for name, _ in uri_fs.list_files(location) if name.endswith("manifest.json")) == \
        ["m/v1/manifest.json", "m/v2/manifest.json"]
    assert other.set_alias("champion", "m@2") == "m@2"
    fresh_cache("cache-d")
    assert Registry(location).resolve("champion").name == "v2"


def test_dashboard_launch_keeps_uris():
    from crystalae.dashboard.launch import launch_command

    command = launch_command("s3://bucket/sweeps", "s3://bucket/registry")
    assert command[-4:] == ["--storage", "s3://bucket/sweeps", "--registry", "s3://bucket/registry"]


def test_a_promote_whose_upload_fails_is_an_error_and_leaves_no_version(s3_bucket, tmp_path, fresh_cache,
                                                                       tiny_checkpoint, capsys):
    """Issue 24: pyarrow's delayed-open writes swallow a failed PutObject; a missing bucket must not
    read as "promoted", and the local mirror must not list or serve the phantom version."""
    missing = s3_bucket.replace("s3://", "s3://no-such-bucket-") + "/registry"
    assert main(["promote", str(tiny_checkpoint), "--registry", missing]) == 2
    err = capsys.readouterr().err
    assert "no-such-bucket-" in err and "does not exist" in err and "Traceback" not in err
    assert main(["models", "--registry", missing]) in (0, 2)
    assert "tinymodel@1" not in capsys.readouterr().out


def test_registry_on_s3_is_the_store_not_a_stale_mirror(s3_server, s3_bucket, tmp_path, fresh_cache,
                                                        tiny_checkpoint, monkeypatch, capsys):
    """Issue 24: concurrent promotes never share a version; the mirror follows the store; a missing
    bucket is an error; a key with '..' is skipped and named."""
    import crystalae.registry as registry_module
    from crystalae.registry import Registry, RegistryError

    location = f"{s3_bucket}/registry"
    Registry(location).promote(tiny_checkpoint, "m")
    # a second writer claims v2 while the first waits on its claim: the first fails, v2 is the second's
    first = Registry(location)
    second_claim = uri_fs.join(location, "m", "v2", registry_module.CLAIM)
    monkeypatch.setattr(registry_module.time, "sleep", lambda s: uri_fs.write_text(second_claim, "the-other-writer"))
    with pytest.raises(RegistryError, match="taken by another writer"):
        first.promote(tiny_checkpoint, "m")
    assert not uri_fs.exists(uri_fs.join(location, "m", "v2", "manifest.json"))
    assert uri_fs.read_text(second_claim) == "the-other-writer"  # the winner's claim is left alone
    # a version deleted from the store is no longer listed or served by a mirror that had it
    fresh_cache("cache-m9")
    reader = Registry(location)
    assert [e["ref"] for e in reader.entries()] == ["m@1"]
    uri_fs.remove_tree(uri_fs.join(location, "m", "v1"))
    assert reader.entries() == []
    with pytest.raises(RegistryError):
        reader.resolve("m@1")
    # a key with '..' under the prefix is skipped and named, the rest still works
    s3_server.client().put_object(Bucket=s3_bucket[len("s3://"):], Key="registry/x/../evil", Body=b"x")
    Registry(location).promote(tiny_checkpoint, "n")
    assert main(["models", "--registry", location]) == 0
    captured = capsys.readouterr()
    assert "n@1" in captured.out and "'..' in a key" in captured.err
    # a bucket that does not exist is an error, not "no models yet"
    assert main(["models", "--registry", s3_bucket.replace("s3://", "s3://no-such-") + "/registry"]) == 2
    assert "does not exist" in capsys.readouterr().err
