"""The rank-aware dataset cache: build once, load the same files everywhere, never accept a half-written cache,
rebuild when the inputs change, and fail with a clear error instead of hanging."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from opensloth.data.cache import (
    CacheBuildError,
    CacheConfig,
    _check_distributed_environment,
    cache_dataset_wrapper,
    dataset_fingerprint,
    read_cache_metadata,
    simple_cache_dataset_wrapper,
    tokenizer_identity,
)
from opensloth.distributed import DistributedEnvironmentError

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    lg = logging.getLogger("opensloth")
    old, lg.propagate = lg.propagate, True
    yield
    lg.propagate = old


class StubTokenizer:
    """Enough of a tokenizer for the cache key: a vocabulary, special tokens and a chat template."""

    def __init__(self, template="{{ messages }}", extra=()):
        self.chat_template = template
        self.vocab = {"a": 0, "b": 1, **{t: 2 + i for i, t in enumerate(extra)}}
        self.special_tokens_map = {"eos_token": "b"}
        self.name_or_path = "stub"

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def _records(n, start=0):
    return [{"id": f"r{i}", "text": f"record number {i}"} for i in range(start, start + n)]


class Factory:
    """A trainer factory that 'processes' raw rows (adds input_ids) and counts how often it really processed."""

    def __init__(self):
        self.processed = 0
        self.calls = []

    def __call__(self, model, tokenizer, train_dataset, val_dataset, world_size, **kwargs):
        self.calls.append({"train_columns": train_dataset.column_names, "world_size": world_size, **kwargs})
        if "input_ids" not in train_dataset.column_names:
            self.processed += 1

            def tok(row):
                return {"input_ids": [len(row["text"]), len(row["id"])]}

            train_dataset = train_dataset.map(tok, remove_columns=train_dataset.column_names)
            if val_dataset is not None:
                val_dataset = val_dataset.map(tok, remove_columns=val_dataset.column_names)
        return SimpleNamespace(train_dataset=train_dataset, eval_dataset=val_dataset)


def _wrap(tmp_path, factory, params=None, **cfg):
    config = CacheConfig(cache_dir=str(tmp_path / "cache"), poll_interval=0.05, **cfg)
    return cache_dataset_wrapper(cache_config=config, cache_key_params=params or {"max_seq_length": 128})(factory)


def _ds(records):
    from datasets import Dataset

    return Dataset.from_list(records)


def _cache_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())


def test_build_once_then_hit(tmp_path):
    factory = Factory()
    build = _wrap(tmp_path, factory)
    train, val = _ds(_records(20)), _ds(_records(5, 100))
    t1 = build(None, StubTokenizer(), train, val, 1, extra="x")
    assert factory.processed == 1
    # Rank 0 returns its trainer with the datasets swapped for the copies loaded from the cache files.
    (folder,) = _cache_dirs(tmp_path)
    assert all(folder in f["filename"] for f in t1.train_dataset.cache_files)
    t2 = build(None, StubTokenizer(), train, val, 1, extra="x")
    assert factory.processed == 1  # the hit called the factory with processed data, which it did not reprocess
    assert factory.calls[-1]["train_columns"] == ["input_ids"] and factory.calls[-1]["extra"] == "x"
    assert t2.train_dataset.to_list() == t1.train_dataset.to_list()
    assert t2.eval_dataset.to_list() == [{"input_ids": [len(f"record number {i}"), len(f"r{i}")]}
                                         for i in range(100, 105)]
    meta = json.loads((tmp_path / "cache" / folder / "cache_metadata.json").read_text())
    assert meta["key_material"]["params"] == {"max_seq_length": 128}
    assert meta["key_material"]["train"]["rows"] == 20 and meta["key_material"]["val"]["rows"] == 5
    assert meta["splits"]["train"]["rows"] == 20 and meta["complete"] is True
    assert folder.endswith(meta["key"])


@pytest.mark.parametrize("change", ["param_value", "new_param", "tokenizer_template", "tokenizer_vocab",
                                    "train_size", "train_content", "val_missing"])
def test_changed_inputs_give_a_new_cache(tmp_path, change):
    factory = Factory()
    train, val = _records(20), _records(5, 100)
    params, tok = {"max_seq_length": 128}, StubTokenizer()
    _wrap(tmp_path, factory, params)(None, tok, _ds(train), _ds(val), 1)
    if change == "param_value":
        params = {"max_seq_length": 256}
    elif change == "new_param":
        params = {"max_seq_length": 128, "packing": True}
    elif change == "tokenizer_template":
        tok = StubTokenizer(template="{{ messages | tojson }}")
    elif change == "tokenizer_vocab":
        tok = StubTokenizer(extra=["<new>"])
    elif change == "train_size":
        train = train[:-1]
    elif change == "train_content":
        train = [dict(train[0], text="changed")] + train[1:]
    elif change == "val_missing":
        val = None
    _wrap(tmp_path, factory, params)(None, tok, _ds(train), _ds(val) if val else None, 1)
    assert factory.processed == 2
    assert len(_cache_dirs(tmp_path)) == 2


def test_real_tokenizer_change_gives_a_new_key(qwen3_tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(qwen3_tokenizer.name_or_path)
    assert tokenizer_identity(other) == tokenizer_identity(qwen3_tokenizer)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    assert tokenizer_identity(other) != tokenizer_identity(qwen3_tokenizer)
    third = AutoTokenizer.from_pretrained(qwen3_tokenizer.name_or_path)
    third.add_tokens(["<opensloth_new_token>"])
    assert tokenizer_identity(third) != tokenizer_identity(qwen3_tokenizer)


def test_fingerprint_is_content_sensitive_and_deterministic():
    recs = _records(50)
    assert dataset_fingerprint(_ds(recs)) == dataset_fingerprint(_ds(recs))
    assert dataset_fingerprint(_ds(recs))["sample_sha256"] == dataset_fingerprint(list(recs))["sample_sha256"]
    changed = [dict(r) for r in recs]
    changed[-1]["text"] = "other"
    assert dataset_fingerprint(_ds(changed)) != dataset_fingerprint(_ds(recs))
    changed[-1] = recs[-1]
    changed[25]["text"] = "middle change"  # row 25 is not in the sample; "full" sees it
    assert dataset_fingerprint(_ds(changed), "full") != dataset_fingerprint(_ds(recs), "full")


def test_mismatching_metadata_is_rebuilt_not_used(tmp_path, caplog):
    factory = Factory()
    build = _wrap(tmp_path, factory)
    train = _ds(_records(10))
    build(None, StubTokenizer(), train, None, 1)
    (folder,) = _cache_dirs(tmp_path)
    meta_path = tmp_path / "cache" / folder / "cache_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["key_material"]["params"]["max_seq_length"] = 999  # a cache built for other inputs under this name
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="opensloth"):
        out = build(None, StubTokenizer(), train, None, 1)
    assert factory.processed == 2
    assert "rebuilding the dataset cache" in caplog.text and "params" in caplog.text
    assert json.loads(meta_path.read_text())["key_material"]["params"]["max_seq_length"] == 128
    assert len(out.train_dataset) == 10
    # A missing ready flag (an incomplete write) is rebuilt too.
    (tmp_path / "cache" / folder / ".ready").unlink()
    build(None, StubTokenizer(), train, None, 1)
    assert factory.processed == 3


def test_waiting_rank_times_out_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    factory = Factory()
    build = _wrap(tmp_path, factory, timeout_seconds=0.5)
    with pytest.raises(TimeoutError) as err:
        build(None, StubTokenizer(), _ds(_records(4)), None, 2)
    msg = str(err.value)
    assert "rank 1 waited" in msg and "timeout_seconds=0.5" in msg and str(tmp_path / "cache") in msg
    assert factory.calls == []


def test_waiting_rank_stops_on_rank0_error_marker(tmp_path, monkeypatch):
    """Without a process group, a failed rank 0 leaves an error marker; the waiting rank raises it at once."""
    from opensloth.data import cache as cache_mod

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_wait = cache_mod._wait_for_cache
    waited_on = []

    def rank0_fails_meanwhile(path, expected, config, rank):
        # What rank 0's failure handler writes next to the cache folder it was building.
        cache_mod._write_json(cache_mod._error_path(path), {"error": "RuntimeError: tokenizer exploded",
                                                             "time": time.time()})
        waited_on.append(path)
        return real_wait(path, expected, config, rank)

    monkeypatch.setattr(cache_mod, "_wait_for_cache", rank0_fails_meanwhile)
    build = _wrap(tmp_path, Factory(), timeout_seconds=60)
    t0 = time.monotonic()
    with pytest.raises(CacheBuildError, match="rank 0 failed to build the dataset cache .*tokenizer exploded"):
        build(None, StubTokenizer(), _ds(_records(4)), None, 2)
    assert waited_on
    assert time.monotonic() - t0 < 30  # long before the 60 s timeout


def test_stale_error_marker_from_an_earlier_run_is_ignored(tmp_path, monkeypatch):
    from opensloth.data import cache as cache_mod

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_wait = cache_mod._wait_for_cache

    def earlier_failure(path, expected, config, rank):
        cache_mod._write_json(cache_mod._error_path(path), {"error": "RuntimeError: yesterday's failure",
                                                             "time": time.time() - 3600})
        return real_wait(path, expected, config, rank)

    monkeypatch.setattr(cache_mod, "_wait_for_cache", earlier_failure)
    build = _wrap(tmp_path, Factory(), timeout_seconds=0.5)
    with pytest.raises(TimeoutError, match="an older error is recorded: RuntimeError: yesterday's failure"):
        build(None, StubTokenizer(), _ds(_records(4)), None, 2)


def test_distributed_environment_is_validated(monkeypatch):
    assert _check_distributed_environment() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _check_distributed_environment() == (1, 2, 1)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(DistributedEnvironmentError, match="LOCAL_RANK='one' is not an integer"):
        _check_distributed_environment()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1.5")
    with pytest.raises(DistributedEnvironmentError, match="WORLD_SIZE"):
        _check_distributed_environment()


def test_unhashable_key_params_are_rejected():
    with pytest.raises(TypeError, match=r"cache_key_params\['model'\].*cannot go into the cache key"):
        cache_dataset_wrapper(cache_key_params={"model": object()})


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_seconds=0"):
        CacheConfig(timeout_seconds=0)
    with pytest.raises(ValueError, match="content_fingerprint='md5'"):
        CacheConfig(content_fingerprint="md5")


def test_seed_import_path_and_signature(tmp_path):
    from opensloth.utils import simple_cache_dataset_wrapper as seed_wrapper

    assert seed_wrapper is simple_cache_dataset_wrapper
    factory = Factory()
    build = seed_wrapper(cache_dir=str(tmp_path / "cache"), timeout_minutes=1, max_seq_length=64, tag="v1")(factory)
    out = build(None, StubTokenizer(), _ds(_records(3)), None, 1)
    assert out.train_dataset.column_names == ["input_ids"]
    (folder,) = _cache_dirs(tmp_path)
    meta = json.loads((tmp_path / "cache" / folder / "cache_metadata.json").read_text())
    assert meta["key_material"]["params"] == {"max_seq_length": 64, "tag": "v1"}


def test_importing_opensloth_utils_stays_light():
    code = ("import sys, opensloth.utils as u; heavy = [m for m in ('datasets', 'trl', 'unsloth', 'torch', "
            "'transformers') if m in sys.modules]; assert not heavy, heavy; assert callable(u.cache_dataset_wrapper)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------- multi-process tests

WORKER = textwrap.dedent('''
    import argparse, hashlib, json, os, sys, time
    from types import SimpleNamespace

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache_dir"); ap.add_argument("--log"); ap.add_argument("--pg", default=None)
    ap.add_argument("--real_tokenizer", default=None); ap.add_argument("--records", default=None)
    ap.add_argument("--fail", action="store_true"); ap.add_argument("--hang_after_save", default=None)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    if args.pg:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + args.pg, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    from datasets import Dataset
    from opensloth.data.cache import CacheConfig, cache_dataset_wrapper

    if args.hang_after_save:
        original = Dataset.save_to_disk
        def save_then_hang(self, path, **kw):
            original(self, path, **kw)
            with open(args.hang_after_save, "w") as fh:
                fh.write(path)
            time.sleep(600)
        Dataset.save_to_disk = save_then_hang

    if args.real_tokenizer:
        from transformers import AutoTokenizer
        from opensloth.data.chat import tokenize_chat_dataset
        tokenizer = AutoTokenizer.from_pretrained(args.real_tokenizer)
        with open(args.records) as fh:
            records = [json.loads(line) for line in fh][:120]
        train = Dataset.from_list([{"id": r["id"], "messages": r["messages"]} for r in records[:100]])
        val = Dataset.from_list([{"id": r["id"], "messages": r["messages"]} for r in records[100:]])
    else:
        tokenizer = SimpleNamespace(chat_template="t", name_or_path="stub")
        train = Dataset.from_list([{"text": "row %d" % i} for i in range(50)])
        val = None

    config = CacheConfig(cache_dir=args.cache_dir, timeout_seconds=args.timeout, poll_interval=0.05)

    @cache_dataset_wrapper(cache_config=config, cache_key_params={"max_seq_length": 256})
    def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size):
        if "input_ids" not in train_dataset.column_names:
            with open(args.log, "a") as fh:
                fh.write("%d processed\\n" % os.getpid())
            if args.fail:
                raise RuntimeError("factory failed on purpose")
            time.sleep(1.0)  # make the other rank really wait
            if args.real_tokenizer:
                train_dataset = tokenize_chat_dataset(train_dataset, tokenizer, max_seq_length=256)
                val_dataset = tokenize_chat_dataset(val_dataset, tokenizer, max_seq_length=256)
            else:
                train_dataset = train_dataset.map(lambda r: {"input_ids": [len(r["text"])] * 3},
                                                  remove_columns=["text"])
        return SimpleNamespace(train_dataset=train_dataset, eval_dataset=val_dataset)

    trainer = build_trainer(None, tokenizer, train, val, int(os.environ.get("WORLD_SIZE", "1")))
    files = sorted(f["filename"] for f in trainer.train_dataset.cache_files)
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as fh:
            h.update(fh.read())
    content = hashlib.sha256(json.dumps(trainer.train_dataset.to_list()).encode()).hexdigest()
    print("RESULT " + json.dumps({"rank": int(os.environ.get("RANK", "0")), "files": files, "bytes": h.hexdigest(),
                                  "content": content, "rows": len(trainer.train_dataset),
                                  "columns": trainer.train_dataset.column_names,
                                  "val_rows": None if trainer.eval_dataset is None else len(trainer.eval_dataset)}))
''')


def _launch(tmp_path, rank, world_size, *extra):
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(world_size), "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "OPENSLOTH_LOG_LEVEL": "INFO"}
    env.pop("LOCAL_WORLD_SIZE", None)
    cmd = [sys.executable, str(script), "--cache_dir", str(tmp_path / "cache"), "--log", str(tmp_path / "build.log"),
           *extra]
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result line:\n{out}\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _build_count(tmp_path):
    path = tmp_path / "build.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_build_once_and_load_the_same_bytes(tmp_path, shared_data):
    extra = ("--real_tokenizer", str(shared_data / "tokenizers" / "qwen3"),
             "--records", str(shared_data / "chat" / "hh_rlhf_helpful_base_test.jsonl"))
    procs = [_launch(tmp_path, rank, 2, *extra) for rank in (0, 1)]
    r0, r1 = (_result(p) for p in procs)
    assert _build_count(tmp_path) == 1
    assert r0["files"] == r1["files"] and r0["files"]  # the very same arrow files...
    assert r0["bytes"] == r1["bytes"] and r0["content"] == r1["content"]  # ...with the same bytes and rows
    assert r0["rows"] == r1["rows"] == 100 and r0["val_rows"] == r1["val_rows"] == 20
    assert r0["columns"] == ["input_ids", "labels"]
    (folder,) = _cache_dirs(tmp_path)
    assert all(f"/cache/{folder}/" in f for f in r0["files"])
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_process_group_barrier_and_rank0_failure(tmp_path):
    pytest.importorskip("torch.distributed")
    pg = tmp_path / "pg_ok"
    r0, r1 = (_result(p) for p in [_launch(tmp_path, rank, 2, "--pg", str(pg)) for rank in (0, 1)])
    assert _build_count(tmp_path) == 1
    assert r0["bytes"] == r1["bytes"] and r0["files"] == r1["files"] and r0["rows"] == 50
    # Rank 0's factory fails: rank 1 gets a clear error through the barrier instead of waiting forever.
    (tmp_path / "build.log").unlink()
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    procs = [_launch(fail_dir, rank, 2, "--pg", str(fail_dir / "pg"), "--fail") for rank in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert procs[0].returncode != 0 and "factory failed on purpose" in outs[0][1]
    assert procs[1].returncode != 0 and "CacheBuildError" in outs[1][1] and "factory failed on purpose" in outs[1][1]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_builder_leaves_nothing_a_later_run_accepts(tmp_path):
    marker = tmp_path / "saved"
    proc = _launch(tmp_path, 0, 2, "--hang_after_save", str(marker))  # rank 0 of 2; rank 1 comes later
    deadline = time.monotonic() + 200
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the builder never reached save_to_disk"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # midway: the train split is on disk, metadata and ready flag are not
    proc.communicate(timeout=60)
    cache = tmp_path / "cache"
    debris = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert len(debris) == 1 and (debris[0] / "train_dataset").is_dir()
    assert read_cache_metadata(debris[0])[0] is None
    assert [p for p in cache.iterdir() if p.is_dir() and ".tmp-" not in p.name] == []
    # A rank waiting for this cache does not take the debris for it: it times out with a clear error.
    waiter = _launch(tmp_path, 1, 2, "--timeout", "1")
    _, err = waiter.communicate(timeout=120)
    assert waiter.returncode != 0 and "TimeoutError" in err and "rank 1 waited" in err
    # The next rank 0 rebuilds (a second "processed" line), succeeds and clears the debris.
    marker.unlink()
    result = _result(_launch(tmp_path, 0, 2))
    assert _build_count(tmp_path) == 2 and result["rows"] == 50
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert result["files"] and all(".tmp-" not in f for f in result["files"])


def test_precompute_script_writes_a_loadable_dataset(tmp_path, shared_data, monkeypatch, capsys):
    import importlib.util

    import opensloth.distributed
    from opensloth.data.cache import load_prepared_dataset

    monkeypatch.setattr(opensloth.distributed, "setup_logging", lambda *a, **k: None)
    path = ROOT / "train_scripts" / "precompute_dataset.py"
    spec = importlib.util.spec_from_file_location("precompute_dataset", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--data", str(shared_data / "chat" / "hh_rlhf_helpful_base_test.jsonl"), "--tokenizer",
            str(shared_data / "tokenizers" / "qwen3"), "--max_records", "60", "--val_size", "10", "--max_seq_length",
            "300", "--output_dir", str(tmp_path), "--name", "hh"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert f"--skip_prepare --prepared_dataset_path {tmp_path / 'hh'}" in out
    train, val, meta = load_prepared_dataset(tmp_path / "hh")
    assert (len(train), len(val)) == (50, 10)
    assert train.column_names == ["input_ids", "labels"] and max(len(x) for x in train["input_ids"]) <= 300
    assert meta["stats"]["train"]["chat"]["records_in"] == 50 and meta["args"]["max_seq_length"] == 300
    assert meta["sources"][0]["rows"] == 2344 and len(meta["sources"][0]["sha256"]) == 64
    with pytest.raises(SystemExit, match="already holds a complete precomputed dataset"):
        script.main(argv)
    # --pack: rows of at most CAPACITY tokens holding every token of the tokenised samples.
    assert script.main([*argv, "--overwrite", "--pack", "1024"]) == 0
    packed, _, meta = load_prepared_dataset(tmp_path / "hh")
    assert "seq_lengths" in packed.column_names and meta["packed_capacity"] == 1024
    assert sum(len(x) for x in packed["input_ids"]) == sum(len(x) for x in train["input_ids"])
    assert all(len(x) <= 1024 and sum(s) == len(x) for x, s in zip(packed["input_ids"], packed["seq_lengths"],
                                                                      strict=True))
    with pytest.raises(FileNotFoundError, match="not a complete precomputed dataset"):
        load_prepared_dataset(tmp_path / "missing")
