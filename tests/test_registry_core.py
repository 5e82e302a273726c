"""Registry: registration, validation refusals that leave nothing behind, aliases and their history."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from abrec.models import registry
from abrec.models.registry import ModelAliasHistory, ModelVersion, RegistryError
from abrec.models.store import DirectoryStore, FsspecStore, StoreError, open_store, sha256_file
from sqlalchemy import func, inspect, select

from abrec.db import init_db, make_engine, session_factory


@pytest.fixture
def reg(db_url: str, tmp_path: Path):
    engine = make_engine(db_url)
    init_db(engine)
    yield session_factory(engine), DirectoryStore(tmp_path / "store")
    engine.dispose()


def test_init_db_creates_registry_tables(db_url: str) -> None:
    engine = make_engine(db_url)
    init_db(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"model_versions", "model_aliases", "model_alias_history"} <= tables
    engine.dispose()


def test_register_alias_history_round_trip(reg, make_checkpoint) -> None:
    sessions, store = reg
    first, second = make_checkpoint(seed=1), make_checkpoint(seed=2)
    with sessions() as s:
        v1 = registry.register_model(s, store, first, "tron", actor="alice", description="first")
        v2 = registry.register_model(s, store, second, "tron", actor="bob")
    assert (v1.label, v2.label) == ("tron:1", "tron:2")
    assert v1.sha256 == sha256_file(first) and v1.size_bytes == first.stat().st_size
    # The artifact in the store is byte-identical to the registered file.
    assert sha256_file(store.fetch(v1.artifact_key, v1.sha256)) == v1.sha256
    assert v1.kind == "tron" and v1.n_items == 60 and v1.config["hidden"] == 16
    assert v1.data_fingerprint == "synthetic-1" and v1.metrics == {"recall@20": 0.5, "mrr@20": 0.2}
    expected_map = json.dumps([f"i{j}" for j in range(60)], separators=(",", ":"))
    assert v1.item_map_sha256 == hashlib.sha256(expected_map.encode()).hexdigest()
    assert v1.created_by == "alice" and v1.description == "first"

    before = datetime.now(UTC)
    with sessions() as s:
        move = registry.set_alias(s, "tron@champion", "tron:1", actor="alice", reason="launch")
        s.commit()
    assert (move.from_version, move.to_version, move.changed) == (None, "tron:1", True)
    between = datetime.now(UTC)
    with sessions() as s:
        move = registry.set_alias(s, "tron@champion", "tron:2", actor="bob")
        same = registry.set_alias(s, "tron@champion", "tron:2", actor="bob")
        s.commit()
    after = datetime.now(UTC)
    assert (move.from_version, move.to_version) == ("tron:1", "tron:2") and not same.changed

    with sessions() as s:
        assert registry.resolve(s, "tron@champion").label == "tron:2"
        assert registry.resolve(s, "tron:1").label == "tron:1"
        history = [h.to_dict() for h in registry.alias_history(s, "tron@champion")]
        assert [(h["from"], h["to"], h["actor"]) for h in history] == [
            (None, "tron:1", "alice"),
            ("tron:1", "tron:2", "bob"),
        ]
        assert history[0]["reason"] == "launch"
        assert registry.alias_at(s, "tron@champion", before - timedelta(seconds=1)) is None
        assert registry.alias_at(s, "tron@champion", between).label == "tron:1"
        assert registry.alias_at(s, "tron@champion", after).label == "tron:2"
        assert registry.popular_items(s, "tron@champion")[:3] == ["i0", "i1", "i2"]
        assert [v.label for v in registry.list_versions(s, "tron")] == ["tron:1", "tron:2"]
        assert [a.ref for a in registry.list_aliases(s)] == ["tron@champion"]


def test_aliases_only_point_within_their_model(reg, make_checkpoint) -> None:
    sessions, store = reg
    with sessions() as s:
        registry.register_model(s, store, make_checkpoint(seed=1), "tron", actor="a")
        registry.register_model(s, store, make_checkpoint(seed=2), "sasrec", actor="a")
        with pytest.raises(RegistryError, match="only point to a version of 'tron'"):
            registry.set_alias(s, "tron@champion", "sasrec:1", actor="a")
        with pytest.raises(registry.NotFound, match="no model version tron:9"):
            registry.set_alias(s, "tron@champion", "tron:9", actor="a")
        with pytest.raises(RegistryError, match="name@alias"):
            registry.set_alias(s, "tron-champion", "tron:1", actor="a")
        with pytest.raises(registry.NotFound, match="no alias"):
            registry.resolve(s, "tron@nobody")


def _assert_nothing_left(sessions, store: DirectoryStore) -> None:
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 0
    files = [p for p in store.root.rglob("*") if p.is_file()] if store.root.exists() else []
    assert files == []


def _corruptions(make_checkpoint, tmp_path: Path) -> dict[str, Path]:
    good = make_checkpoint(seed=3)
    data = good.read_bytes()
    out = {}
    out["truncated"] = tmp_path / "truncated.safetensors"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["random bytes"] = tmp_path / "random.safetensors"
    out["random bytes"].write_bytes(bytes(range(256)) * 40)
    out["empty"] = tmp_path / "empty.safetensors"
    out["empty"].write_bytes(b"")
    # A valid safetensors file that is not an abrec checkpoint (no metadata).
    import torch
    from safetensors.torch import save_file

    out["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(out["foreign"]))
    # Flipped bytes in the middle of the weights: still loads, so this one is caught by hashing
    # only if it is not finite; make it NaN to prove the smoke inference catches it.
    from abrec.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(good)
    with torch.no_grad():
        ckpt.model.item_emb.weight[5, 0] = float("nan")
    out["nan weights"] = save_checkpoint(
        tmp_path / "nan.safetensors", ckpt.model, kind="tron", config=ckpt.config, item_map=ckpt.item_map,
        metrics={}, popular=ckpt.popular, data_fingerprint="x",
    )
    out["unknown kind"] = tmp_path / "kind.safetensors"
    save_checkpoint(out["unknown kind"], ckpt.model, kind="mystery", config=ckpt.config | {"arch": "sasrec"},
                    item_map=ckpt.item_map, metrics={}, popular=[], data_fingerprint="x")
    return out


def test_corrupt_checkpoints_are_refused_and_leave_nothing(reg, make_checkpoint, tmp_path: Path) -> None:
    sessions, store = reg
    for what, path in _corruptions(make_checkpoint, tmp_path).items():
        with sessions() as s, pytest.raises(RegistryError, match="refused") as info:
            registry.register_model(s, store, path, "tron", actor="a")
        assert str(info.value), what
        _assert_nothing_left(sessions, store)
    with sessions() as s, pytest.raises(RegistryError, match="not a file"):
        registry.register_model(s, store, tmp_path / "missing.safetensors", "tron", actor="a")
    _assert_nothing_left(sessions, store)


def test_refusal_messages_name_the_problem(reg, make_checkpoint, tmp_path: Path) -> None:
    sessions, store = reg
    cases = _corruptions(make_checkpoint, tmp_path)
    with sessions() as s:
        with pytest.raises(RegistryError, match="non-finite"):
            registry.register_model(s, store, cases["nan weights"], "tron", actor="a")
        with pytest.raises(RegistryError, match="unknown model kind 'mystery'"):
            registry.register_model(s, store, cases["unknown kind"], "tron", actor="a")
        with pytest.raises(RegistryError, match="not an abrec checkpoint"):
            registry.register_model(s, store, cases["foreign"], "tron", actor="a")


def test_failed_database_insert_removes_the_stored_artifact(reg, make_checkpoint, monkeypatch) -> None:
    sessions, store = reg

    def broken_commit(self):
        raise RuntimeError("database went away")

    with sessions() as s:
        monkeypatch.setattr(type(s), "commit", broken_commit)
        with pytest.raises(RuntimeError, match="went away"):
            registry.register_model(s, store, make_checkpoint(seed=4), "tron", actor="a")
    monkeypatch.undo()
    _assert_nothing_left(sessions, store)


def test_same_content_twice_is_refused(reg, make_checkpoint) -> None:
    sessions, store = reg
    path = make_checkpoint(seed=5)
    with sessions() as s:
        registry.register_model(s, store, path, "tron", actor="a")
        with pytest.raises(RegistryError, match="already registered as tron:1"):
            registry.register_model(s, store, path, "tron", actor="a")
        # The same file under another model name is a different model, so it is allowed.
        assert registry.register_model(s, store, path, "tron-copy", actor="a").label == "tron-copy:1"


def test_versions_and_history_are_immutable(reg, make_checkpoint) -> None:
    sessions, store = reg
    with sessions() as s:
        registry.register_model(s, store, make_checkpoint(seed=6), "tron", actor="a")
        registry.set_alias(s, "tron@champion", "tron:1", actor="a")
        s.commit()
        version = registry.get_version(s, "tron:1")
        version.description = "rewritten"
        with pytest.raises(RegistryError, match="immutable"):
            s.flush()
        s.rollback()
        row = s.scalar(select(ModelAliasHistory))
        s.delete(row)
        with pytest.raises(RegistryError, match="immutable"):
            s.flush()


def test_validation_in_a_subprocess_matches_in_process(make_checkpoint, tmp_path: Path) -> None:
    path = make_checkpoint(seed=7)
    assert registry.validate_in_subprocess(path) == registry.validate_checkpoint(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(RegistryError, match="refused"):
        registry.validate_in_subprocess(bad)


def test_directory_store_round_trip_and_checks(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    store = open_store(tmp_path / "store")
    assert isinstance(store, DirectoryStore)
    store.put(src, "m/1-x.safetensors")
    assert store.exists("m/1-x.safetensors")
    assert store.fetch("m/1-x.safetensors", hashlib.sha256(b"hello").hexdigest()).read_bytes() == b"hello"
    with pytest.raises(StoreError, match="does not match"):
        store.fetch("m/1-x.safetensors", "0" * 64)
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.put(src, "../escape")
    store.delete("m/1-x.safetensors")
    assert not store.exists("m/1-x.safetensors") and not (tmp_path / "store" / "m").exists()
    with pytest.raises(StoreError, match="missing"):
        store.fetch("m/1-x.safetensors")


def test_object_store_through_fsspec(reg, make_checkpoint, tmp_path: Path) -> None:
    sessions, _ = reg
    store = open_store("memory://abrec-test-registry")
    assert isinstance(store, FsspecStore)
    store.cache_dir = tmp_path / "cache"
    with sessions() as s:
        row = registry.register_model(s, store, make_checkpoint(seed=8), "tron", actor="a")
    assert store.exists(row.artifact_key)
    local = store.fetch(row.artifact_key, row.sha256)
    assert local.is_relative_to(tmp_path / "cache") and sha256_file(local) == row.sha256
    store.delete(row.artifact_key)
    assert not store.exists(row.artifact_key)


def test_registry_client_and_admin_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, abrec.models.client, abrec.models.registry, abrec.models.store\n"
        "from abrec.experiments.models_admin import models_admin_bp\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
