"""The cached index: memory-mapped numpy columns, string tables, cache keys, rebuild on change, one builder."""
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from dualloop.data import open_dataset, write_synthetic_corpus
from dualloop.data.index import StringTable, cached_index, file_signature

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALLOOP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_string_table_round_trip():
    words = ["", "a", "héllo", "sa_1.json", "x" * 300]
    t = StringTable.from_list(words)
    assert len(t) == 5 and t.tolist() == words and t[-1] == "x" * 300
    empty = StringTable.from_list([])
    assert len(empty) == 0


def test_cached_index_builds_once_and_memory_maps(tmp_path, cache):
    ann = tmp_path / "ann.txt"
    ann.write_text("v1")
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(10, dtype=np.int32), "names": ["x", "yy", "zzz"]}, {"note": 1}

    ix = cached_index("demo", tmp_path, {"opt": 1}, file_signature([ann]), build)
    again = cached_index("demo", tmp_path, {"opt": 1}, file_signature([ann]), build)
    assert len(calls) == 1
    assert isinstance(again["a"], np.memmap) and again["a"].tolist() == list(range(10))
    assert again["names"].tolist() == ["x", "yy", "zzz"] and isinstance(again["names"].offsets, np.memmap)
    assert again.meta["note"] == 1 and ix.path == again.path and str(cache) in str(ix.path)
    cached_index("demo", tmp_path, {"opt": 2}, file_signature([ann]), build)  # other options: other key
    assert len(calls) == 2
    time.sleep(0.01)
    ann.write_text("v2, longer")  # size and mtime change: rebuild
    cached_index("demo", tmp_path, {"opt": 1}, file_signature([ann]), build)
    assert len(calls) == 3


def _open_in_child(root, queue):
    ds = open_dataset("refcoco", root, split="train")
    queue.put((len(ds), str(ds.index.path)))


def test_concurrent_processes_share_one_index(tmp_path, cache):
    corpus = write_synthetic_corpus(tmp_path / "c", seed=2)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(corpus["refcoco"], q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(results)) == 1
    entries = [e for e in os.listdir(cache / "index") if not e.endswith(".lock")]
    assert [e for e in entries if e.startswith("refcoco-")] == [os.path.basename(results[0][1])]


def test_reader_columns_are_memory_mapped_and_key_covers_options(tmp_path, cache):
    corpus = write_synthetic_corpus(tmp_path / "c", seed=2)
    a = open_dataset("sa1b", corpus["sa1b"])
    b = open_dataset("sa1b", corpus["sa1b"], max_files=3)
    assert isinstance(a.file, np.memmap) and isinstance(a.json_paths.offsets, np.memmap)
    assert a.index.path != b.index.path and len(b) < len(a)
    assert open_dataset("sa1b", corpus["sa1b"]).index.path == a.index.path
