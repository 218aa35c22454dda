"""bench/quality/vit.py and bench_vit.py: where a base's and a set's files live, and their seeds.

Base 0's set 0 must keep the first run's folders and seeds (its caches and documented figures);
every other (base, set) must get folders of its own."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

import bench_vit  # noqa: E402
import vit  # noqa: E402


def test_base_zero_keeps_the_first_runs_folders():
    assert vit.set_root(False, 0) == vit.CACHE / "vit"
    assert vit.set_root(False, 0, 0) == vit.CACHE / "vit"
    assert vit.set_root(False, 2) == vit.CACHE / "vit" / "ft_seed2"
    assert vit.set_root(True, 1) == vit.CACHE / "vit_quick" / "ft_seed1"
    assert vit.base_home(False, 0) == vit.CACHE / "vit"


def test_another_base_holds_its_own_sets():
    assert vit.base_home(False, 1) == vit.CACHE / "vit" / "base_seed1"
    assert vit.set_root(False, 0, 1) == vit.CACHE / "vit" / "base_seed1"
    assert vit.set_root(False, 2, 3) == vit.CACHE / "vit" / "base_seed3" / "ft_seed2"
    assert vit.set_root(True, 0, 1) == vit.CACHE / "vit_quick" / "base_seed1"


def test_every_base_and_set_has_its_own_folder():
    roots = [vit.set_root(False, s, b) for b in range(3) for s in range(3)]
    assert len(set(roots)) == 9
    # no set's records folder is another base's base/ folder
    assert not {vit.base_home(False, b) / "base" for b in range(3)} & set(roots)


def test_seeds():
    assert [vit.pretrain_seed(b) for b in (0, 1, 5)] == [0, 1, 5]  # base 0: the first run's seed 0
    assert vit.finetune_seed("rot90", 0) == sum(map(ord, "rot90"))  # the first run's
    assert vit.finetune_seed("rot90", 2) == sum(map(ord, "rot90")) + 200_006


def test_log_names():
    assert bench_vit.log_suffix(0, 0) == ""
    assert bench_vit.log_suffix(2, 0) == "_s2"
    assert bench_vit.log_suffix(0, 1) == "_b1"
    assert bench_vit.log_suffix(2, 1) == "_b1_s2"


def test_set_complete_looks_in_the_bases_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(vit, "CACHE", tmp_path)
    for t in vit.FULL["tasks"]:
        d = tmp_path / "vit" / "base_seed1" / "ft" / t
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
    said = []
    assert bench_vit.set_complete(False, 0, said.append, base_seed=1)
    assert not bench_vit.set_complete(False, 0, said.append)  # base 0 has none
    assert not bench_vit.set_complete(False, 1, said.append, base_seed=1)
    assert len(said) == 2
