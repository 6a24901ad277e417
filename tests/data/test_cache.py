"""The on-disk cache of tokenised data (dpokit/datacache.py): hits, misses on every input, files, damage, races."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import dpokit.train.prepare as api
from dpokit.train.prepare import _columns, prepare_data, tokenize_config
from dpokit.config import TrainConfig
from dpokit.data.cache import (MANIFEST, CacheWriter, DataCache, _shard_arrays, _shard_bytes, cache_inputs, cache_key,
                              read_entry)
from dpokit.errors import DataError
from dpokit.data.arrays import TokenArrays
from dpokit.data.tokenize import FilterReport, examples_from_arrays
from helpers import WORDS, make_tokenizer


def _write_pairs(path: Path, n: int, seed: int = 0, names=("prompt", "chosen", "rejected")) -> str:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for i in range(n):
            chosen = " " + text(1, 12)
            rejected = chosen if i % 17 == 3 else " " + text(1, 40)  # some identical, some too long at 48
            f.write(json.dumps(dict(zip(names, (text(1, 30), chosen, rejected)))) + "\n")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return _write_pairs(tmp_path / "pairs.jsonl", 120)


def _config(data: str, tmp_path, **overrides) -> TrainConfig:
    options = dict(model="unused-model", data=data, output=str(tmp_path / "out"), max_length=48, max_prompt_length=16,
                   eval_fraction=0.1)
    options.update(overrides)
    return TrainConfig(**options)


def _prepare(config, tokenizer, cache_dir, stage="dpo", **kw):
    lines: list[str] = []
    data = prepare_data(config, stage, tokenizer, lines.append, cache_dir=cache_dir, **kw)
    return data, lines


def test_second_run_reuses_the_cache_with_the_same_examples_and_counts(tmp_path, data, tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    config = _config(data, tmp_path)
    first, first_lines = _prepare(config, tokenizer, cache)
    fresh, _ = _prepare(config, tokenizer, cache, use_cache=False)
    assert first == fresh
    assert first_lines[-1].startswith("tokenised data: cached in ")
    entry = Path(first_lines[-1].split(" in ", 1)[1])
    assert entry.parent == cache and (entry / MANIFEST).is_file()

    def boom(*a, **k):
        raise AssertionError("re-tokenised or re-loaded a cached data set")

    monkeypatch.setattr(api, "tokenize_examples", boom)
    monkeypatch.setattr(api, "load_preferences", boom)
    second, second_lines = _prepare(config, tokenizer, cache)
    assert second == first
    assert second_lines == first_lines[:-1] + [f"tokenised data: reusing {entry}"]
    assert any("filtered" in line and "identical chosen and rejected" in line for line in second_lines)
    assert all(type(t) is int for e in second.train for t in e.prompt_ids + e.responses[0])


def _key(config, tokenizer, stage="dpo"):
    inputs, why = cache_inputs(config, stage, tokenizer, tokenize_config(config), _columns(config))
    assert inputs is not None, why
    return cache_key(inputs)


def test_every_input_that_decides_the_token_ids_changes_the_key(tmp_path, data, tokenizer):
    base = _config(data, tmp_path)
    key = _key(base, tokenizer)
    assert _key(_config(data, tmp_path), make_tokenizer()) == key  # the same inputs rebuilt: the same key
    assert _key(_config(data, tmp_path, output=str(tmp_path / "elsewhere"), lr=1e-3, beta=0.5), tokenizer) == key

    changed = {}
    for name, value in dict(max_length=49, max_prompt_length=15, truncation="keep_start", on_filtered="error",
                            format="standard", split="other", eval_fraction=0.2, seed=1, prompt_column="question",
                            chosen_column="good", rejected_column="bad", completion_column="c", responses_column="r",
                            scores_column="s", apply_chat_template=True).items():
        changed[name] = _key(_config(data, tmp_path, **{name: value}), tokenizer)
    changed["stage"] = _key(base, tokenizer, stage="sft")
    changed["eval_data"] = _key(_config(data, tmp_path, eval_data=data), tokenizer)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(Path(data).read_bytes())
    changed["data spec (sources name it)"] = _key(_config(str(copy), tmp_path), tokenizer)
    copy.write_bytes(Path(data).read_bytes().replace(b"the", b"teh", 1))
    changed["data bytes"] = _key(_config(str(copy), tmp_path), tokenizer)
    assert changed["data bytes"] != changed["data spec (sources name it)"]

    chat = make_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    changed["chat template"] = _key(base, chat)
    bos = make_tokenizer()
    bos.bos_token = "<|im_start|>"
    changed["BOS token"] = _key(base, bos)
    added = make_tokenizer()
    added.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    changed["special tokens"] = _key(base, added)
    changed["vocabulary"] = _key(base, make_tokenizer(vocab_size=300))
    from tokenizers import processors
    post = make_tokenizer()
    post.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", post.convert_tokens_to_ids("<|im_start|>"))])
    changed["post-processor"] = _key(base, post)
    assert key not in changed.values()
    assert len(set(changed.values())) == len(changed), changed
    # without held-out eval data the seed decides nothing
    assert _key(_config(data, tmp_path, eval_fraction=0.0), tokenizer) == \
        _key(_config(data, tmp_path, eval_fraction=0.0, seed=5), tokenizer)


def test_a_change_tokenises_again_and_matches_a_fresh_run(tmp_path, data, tokenizer):
    cache = tmp_path / "cache"
    _prepare(_config(data, tmp_path), tokenizer, cache)
    for overrides in (dict(max_length=40), dict(truncation="keep_start"), dict(eval_fraction=0.2)):
        config = _config(data, tmp_path, **overrides)
        got, lines = _prepare(config, tokenizer, cache)
        assert not any("reusing" in line for line in lines)
        assert got == _prepare(config, tokenizer, cache, use_cache=False)[0]
    with open(data, "a") as f:  # the data file itself changes
        f.write(json.dumps({"prompt": "the plot", "chosen": " good", "rejected": " bad"}) + "\n")
    got, lines = _prepare(_config(data, tmp_path), tokenizer, cache)
    assert not any("reusing" in line for line in lines)
    assert got.train[-1].source.endswith(":121") or got.eval[-1].source.endswith(":121")
    assert len(list(cache.iterdir())) == 5


def test_plain_text_with_a_chat_model_is_warned_once_and_apply_chat_template_tokenises_again(tmp_path, data):
    chat = make_tokenizer(chat_template=True)
    cache = tmp_path / "cache"
    raw, lines = _prepare(_config(data, tmp_path), chat, cache)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [warnings[0]] and "120 of 120 examples are plain text" in warnings[0]  # train + eval
    assert warnings[0] in _prepare(_config(data, tmp_path), chat, cache)[1]  # a cache hit says it again
    templated, lines = _prepare(_config(data, tmp_path, apply_chat_template=True), chat, cache)
    assert not any(line.startswith("warning:") or "reusing" in line for line in lines)
    turn = tuple(chat("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])  # (prompts may be cut)
    im_end = chat.convert_tokens_to_ids("<|im_end|>")
    assert all(e.prompt_ids[-len(turn):] == turn and e.responses[0][-1] == im_end for e in templated.train)
    assert not any(e.prompt_ids[-len(turn):] == turn for e in raw.train)


def test_custom_columns_sft_and_eval_file_are_cached(tmp_path, tokenizer):
    names = ("question", "good", "bad")
    train = _write_pairs(tmp_path / "t.jsonl", 60, names=names)
    held = _write_pairs(tmp_path / "e.jsonl", 20, seed=1, names=names)
    config = _config(train, tmp_path, eval_fraction=0.0, eval_data=held, prompt_column="question",
                     chosen_column="good", rejected_column="bad")
    for stage in ("dpo", "sft"):
        first, _ = _prepare(config, tokenizer, tmp_path / "cache", stage=stage)
        second, lines = _prepare(config, tokenizer, tmp_path / "cache", stage=stage)
        assert second == first and len(first.eval) > 0 and "reusing" in lines[-1]
        assert {len(e.responses) for e in first.train} == ({2} if stage == "dpo" else {1})


def test_cache_holds_only_json_and_safetensors(tmp_path, data, tokenizer):
    from safetensors import safe_open

    cache = tmp_path / "cache"
    _prepare(_config(data, tmp_path), tokenizer, cache)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary directory left
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with safe_open(str(path), framework="numpy") as f:
                assert set(f.keys()) == {"tokens", "prompt_lengths", "response_counts", "response_lengths",
                                         "source_bytes", "source_lengths"}
                assert f.get_tensor("tokens").dtype == np.uint16  # a 320-token vocabulary fits


def test_damaged_entry_is_reported_and_rebuilt(tmp_path, data, tokenizer):
    cache = tmp_path / "cache"
    config = _config(data, tmp_path)
    first, lines = _prepare(config, tokenizer, cache)
    entry = Path(lines[-1].split(" in ", 1)[1])
    shard = entry / "train-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    again, lines = _prepare(config, tokenizer, cache)
    assert any("is damaged" in line and "checksum" in line for line in lines)
    assert again == first and lines[-1] == f"tokenised data: cached in {entry}"
    (entry / MANIFEST).write_text("{not json")
    assert _prepare(config, tokenizer, cache)[0] == first
    assert _prepare(config, tokenizer, cache)[1][-1] == f"tokenised data: reusing {entry}"


def test_failed_run_leaves_nothing_and_no_cache_writes_nothing(tmp_path, data, tokenizer):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="filtered"):
        _prepare(_config(data, tmp_path, on_filtered="error"), tokenizer, cache)
    assert list(cache.iterdir()) == []
    _prepare(_config(data, tmp_path), tokenizer, cache, use_cache=False)
    assert list(cache.iterdir()) == []


def test_only_local_rank_zero_writes(tmp_path, data, tokenizer, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    got, lines = _prepare(_config(data, tmp_path), tokenizer, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    assert not any("cached in" in line for line in lines) and got.train


def test_default_directory_is_dpokit_cache_env(tmp_path, data, tokenizer, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "env-cache"))
    lines: list[str] = []
    prepare_data(_config(data, tmp_path), "dpo", tokenizer, lines.append)
    assert lines[-1].startswith(f"tokenised data: cached in {tmp_path / 'env-cache'}")


def _arrays(n: int, vocab: int, seed: int = 0) -> TokenArrays:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 9, n)
    counts = rng.integers(1, 3, n)
    responses = rng.integers(1, 7, int(counts.sum()))
    tokens = rng.integers(0, vocab, int(prompt.sum() + responses.sum()))
    return TokenArrays(tokens.astype(np.int32), prompt.astype(np.int32), counts.astype(np.int32),
                       responses.astype(np.int32), [f"d.jsonl:{i} ü" for i in range(n)])


@pytest.mark.parametrize("vocab", [300, 70000])
def test_shards_round_trip_exactly(vocab):
    arrays = _arrays(50, vocab)
    back = _shard_arrays(_shard_bytes(arrays))
    assert examples_from_arrays(back) == examples_from_arrays(arrays)
    assert back.sources == arrays.sources


def test_several_shards_and_a_concurrent_writer(tmp_path):
    inputs = {"test": 1}
    cache = DataCache(tmp_path, inputs)
    chunks = [_arrays(30, 500, seed=s) for s in range(5)]
    report = FilterReport(kept=150)
    writers = [CacheWriter(tmp_path, cache.key, shard_tokens=200) for _ in range(2)]
    for writer in writers:
        sink = writer.sink("train")
        for chunk in chunks:
            sink(chunk)
    assert writers[0].commit(inputs, ["a line"], {"train": report}) == cache.path
    assert writers[1].commit(inputs, ["another"], {"train": report}) == cache.path  # the first one stays
    entry = read_entry(cache.path)
    assert entry.log == ["a line"] and len(list(cache.path.glob("train-*.safetensors"))) > 1
    assert entry.examples["train"] == [e for c in chunks for e in examples_from_arrays(c)]
    assert [p.name for p in tmp_path.iterdir()] == [cache.key]


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, data, tokenizer):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = tmp_path / "cache"
    stale = cache / f".tmp-0123456789abcdef~{socket.gethostname()}~{dead.stdout.strip()}~cafe0000"
    alive = cache / f".tmp-0123456789abcdef~{socket.gethostname()}~{os.getpid()}~cafe0001"
    stale.mkdir(parents=True)
    alive.mkdir()
    _prepare(_config(data, tmp_path), tokenizer, cache)
    assert not stale.exists() and alive.exists()


def test_a_shard_that_is_not_safetensors_is_a_damaged_entry(tmp_path):
    import hashlib

    from dpokit.data.cache import DamagedEntry

    inputs = {"test": 2}
    writer = CacheWriter(tmp_path, cache_key(inputs))
    writer.sink("train")(_arrays(10, 300))
    path = writer.commit(inputs, [], {"train": FilterReport(kept=10)})
    manifest = json.loads((path / MANIFEST).read_text())
    garbage = b"not a safetensors file"
    (path / "train-00000.safetensors").write_bytes(garbage)
    manifest["parts"]["train"]["shards"][0].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DamagedEntry, match="SafetensorError"):
        read_entry(path)
    assert DataCache(tmp_path, inputs).load(lambda line: None) is None and not path.exists()


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, data, tokenizer, monkeypatch):
    import dpokit.data.cache as datacache

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    got, lines = _prepare(_config(data, tmp_path), tokenizer, blocked / "cache")  # mkdir fails
    assert any(line.startswith("tokenised data: not cached (cannot write") for line in lines) and got.train

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datacache, "_write_synced", full)
    cache = tmp_path / "cache"
    again, lines = _prepare(_config(data, tmp_path), tokenizer, cache)
    assert again == got and lines[-1].startswith("tokenised data: not cached")
    assert "No space left on device" in lines[-1]
    assert list(cache.iterdir()) == []


def test_a_write_failing_mid_tokenisation_stops_the_writer_quietly(tmp_path, monkeypatch):
    import dpokit.data.cache as datacache

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datacache, "_write_synced", full)
    writer = CacheWriter(tmp_path, cache_key({"t": 3}), shard_tokens=10)
    sink = writer.sink("train")
    for seed in range(3):
        sink(_arrays(20, 300, seed=seed))  # the first flush fails; later chunks are dropped
    assert "No space left on device" in writer.error and not writer.tmp.exists()
    assert writer.commit({"t": 3}, [], {"train": FilterReport(kept=60)}) is None
    assert list(tmp_path.iterdir()) == []
