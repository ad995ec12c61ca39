"""The packed universal model is cached on disk, keyed by its weights and packer."""

from __future__ import annotations

import numpy as np
import pytest

from tlc.mojo import runner

PARTS = ("ints", "indices", "value_words", "floats")


@pytest.fixture(scope="module")
def universal():
    weights, packed = runner.load_universal()
    return weights, packed


def _assert_same(first, second) -> None:
    for name in PARTS:
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
        assert getattr(first, name).dtype == getattr(second, name).dtype, name
    assert first.narrow == second.narrow


def test_second_pack_comes_from_the_cache(universal, tmp_path, monkeypatch):
    weights, packed = universal
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path))
    first = runner._cached_pack(weights)
    files = list((tmp_path / "packed").glob("universal-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(runner, "pack_model", lambda _: pytest.fail("packed again"))
    second = runner._cached_pack(weights)
    _assert_same(first, packed)
    _assert_same(second, packed)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cache_is_replaced(universal, tmp_path, monkeypatch, damage):
    weights, packed = universal
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path))
    runner._cached_pack(weights)
    (path,) = (tmp_path / "packed").glob("universal-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    else:
        path.write_bytes(path.read_bytes()[:1000])
    _assert_same(runner._cached_pack(weights), packed)
    _assert_same(runner._cached_pack(weights), packed)


def test_unwritable_cache_still_packs(universal, tmp_path, monkeypatch):
    weights, packed = universal
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TLC_CACHE_DIR", str(blocker))
    _assert_same(runner._cached_pack(weights), packed)


def test_weights_without_checksum_are_not_cached(universal, tmp_path, monkeypatch):
    weights, packed = universal
    monkeypatch.setenv("TLC_CACHE_DIR", str(tmp_path))
    unnamed = runner.ModelWeights(**{**vars(weights), "metadata": {}})
    _assert_same(runner._cached_pack(unnamed), packed)
    assert not (tmp_path / "packed").exists()
