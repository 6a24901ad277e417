"""--streaming (dpokit/streaming.py, dpokit/sharded.py): the same examples, log, training and resume as the in-memory
path, from files, save_to_disk directories, parquet and streamed Hub data, without holding the records or examples."""

from __future__ import annotations

import gc
import json
import random
import re
from pathlib import Path

import pytest

import dpokit.data.streaming as streaming
import dpokit.data.tokenize as tokenize_module
from dpokit.api import prepare_data, train_dpo
from dpokit.config import TrainConfig
from dpokit.data.records import PreferencePair
from dpokit.data.cache import CacheWriter
from dpokit.train.metrics import read_metrics
from dpokit.data.sharded import ShardedExamples, examples_digest, open_entry
from dpokit.data.tokenize import FilterReport, TokenizedExample, tokenize_arrays
from helpers import WORDS

TIMING = {"tokens_per_second", "seconds_per_step"}


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        chosen = " " + text(1, 12)
        rejected = chosen if i % 17 == 3 else " " + text(1, 40)  # some identical, some too long at 48
        if i % 23 == 7:  # a few glued to their prompt (warned about)
            chosen = chosen.lstrip()
        rows.append({"prompt": text(0, 30), "chosen": chosen, "rejected": rejected})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(data: str, tmp_path: Path, **overrides) -> TrainConfig:
    options = dict(model="unused", data=data, output=str(tmp_path / "out"), max_length=48, max_prompt_length=16)
    options.update(overrides)
    return TrainConfig(**options)


def _both(config: TrainConfig, tokenizer, stage: str = "dpo", **kw):
    """(in-memory data, its log lines, streamed data, its log lines) of `config`."""
    memory_lines: list[str] = []
    streamed_lines: list[str] = []
    memory = prepare_data(config, stage, tokenizer, memory_lines.append, use_cache=False)
    config.streaming = True
    streamed = prepare_data(config, stage, tokenizer, streamed_lines.append, **kw)
    config.streaming = False
    return memory, memory_lines, streamed, streamed_lines


@pytest.mark.parametrize("split", ["fraction", "file", "none"])
def test_streamed_examples_and_log_equal_the_in_memory_ones(tmp_path, tokenizer, split):
    data = _jsonl(tmp_path / "pairs.jsonl", _rows(2300))  # three chunks, the last one short
    extra = {"fraction": dict(eval_fraction=0.15, seed=5), "none": {},
             "file": dict(eval_data=_jsonl(tmp_path / "eval.jsonl", _rows(70, seed=1)))}[split]
    memory, memory_lines, streamed, lines = _both(_config(data, tmp_path, **extra), tokenizer,
                                                  cache_dir=tmp_path / "cache")
    assert isinstance(streamed.train, ShardedExamples)
    assert list(streamed.train) == memory.train and len(memory.train) > 300
    assert list(streamed.eval) == memory.eval and bool(memory.eval) == (split != "none")
    assert lines[:-1] == memory_lines and lines[-1].startswith("tokenised data: cached in ")
    # the in-memory path names the first glued training record (row 7 is held out with seed 5), streaming too
    glued = r"warning: 9\d of 2300 examples join prompt .* at \S+pairs.jsonl:31\)"
    assert split != "fraction" or any(re.match(glued, line) for line in lines)
    assert all(type(t) is int for e in streamed.train[:5] for t in e.prompt_ids + e.responses[1])
    assert streamed.train[-1] == memory.train[-1] and streamed.train[10:13] == memory.train[10:13]
    with pytest.raises(IndexError):
        streamed.train[len(memory.train)]


def test_cache_entries_are_shared_by_both_paths(tmp_path, tokenizer, monkeypatch):
    """A streamed run reuses the entry an in-memory run wrote (lazily), and the other way round."""
    data = _jsonl(tmp_path / "pairs.jsonl", _rows(300))
    cache = tmp_path / "cache"
    first_lines: list[str] = []
    first = prepare_data(_config(data, tmp_path, eval_fraction=0.1), "dpo", tokenizer, first_lines.append,
                         cache_dir=cache)

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(streaming, "ChunkTokenizer", boom)
    lines: list[str] = []
    again = prepare_data(_config(data, tmp_path, eval_fraction=0.1, streaming=True), "dpo", tokenizer,
                         lines.append, cache_dir=cache)
    assert isinstance(again.train, ShardedExamples) and list(again.train) == first.train
    assert list(again.eval) == first.eval
    assert lines == first_lines[:-1] + [first_lines[-1].replace("cached in", "reusing")]
    # a damaged shard: reported, tokenised again, still the same examples
    monkeypatch.undo()
    shard = next(Path(lines[-1].split("reusing ", 1)[1]).glob("train-*.safetensors"))
    del again
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    lines = []
    rebuilt = prepare_data(_config(data, tmp_path, eval_fraction=0.1, streaming=True), "dpo", tokenizer,
                           lines.append, cache_dir=cache)
    assert "is damaged" in lines[0] and list(rebuilt.train) == first.train


def test_without_a_cache_the_shards_are_temporary(tmp_path, tokenizer):
    data = _jsonl(tmp_path / "pairs.jsonl", _rows(200))
    cache = tmp_path / "cache"
    memory, memory_lines, streamed, lines = _both(_config(data, tmp_path), tokenizer, cache_dir=cache, use_cache=False)
    assert list(streamed.train) == memory.train and lines[:-1] == memory_lines
    entry = Path(lines[-1].split(" in ", 1)[1].split(" (", 1)[0])
    assert entry.parent == cache and entry.is_dir() and "removed when this run ends" in lines[-1]
    del streamed
    gc.collect()
    assert not entry.exists()


def test_the_other_processes_wait_for_the_writers_entry_or_stop_with_it(tmp_path, tokenizer):
    """Under several processes the node's first process writes the entry and the others read it once its manifest
    is in place (tests/train/test_engine.py runs that for real); if the writer gives up, they stop instead of waiting."""
    import shutil
    import threading

    from dpokit.errors import DataError

    data = _jsonl(tmp_path / "pairs.jsonl", _rows(200))
    lines: list[str] = []
    written = prepare_data(_config(data, tmp_path, streaming=True), "dpo", tokenizer, lines.append,
                           cache_dir=tmp_path / "cache")
    entry = Path(lines[-1].split("cached in ", 1)[1])
    writing, final = tmp_path / "writing", tmp_path / "final"
    shutil.copytree(entry, writing)
    threading.Timer(0.3, lambda: writing.rename(final)).start()  # the writer's commit, while the other waits
    train, evaluation = streaming._read_shared((str(final), str(writing)))
    assert list(train) == list(written.train) and evaluation == []
    with pytest.raises(DataError, match="first process of this node failed"):
        streaming._read_shared((str(tmp_path / "never"), str(tmp_path / "aborted")))  # its directory is gone
    with pytest.raises(DataError, match="first process of this node failed"):
        streaming._read_shared(None)  # it failed before it began


def test_save_to_disk_parquet_and_sft(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = _rows(400, seed=2)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for spec, stage in ((saved, "dpo"), (parquet, "dpo"), (parquet, "sft")):
        memory, memory_lines, streamed, lines = _both(_config(str(spec), tmp_path, eval_fraction=0.2), tokenizer,
                                                      stage, cache_dir=tmp_path / "cache")
        assert list(streamed.train) == memory.train and list(streamed.eval) == memory.eval
        assert lines[:-1] == memory_lines
        assert len(streamed.train[0].responses) == (2 if stage == "dpo" else 1)


@pytest.mark.parametrize("wrap", [False, True])
def test_a_chat_tokenizer_warns_or_wraps_plain_text_alike(tmp_path, chat_tokenizer, wrap):
    """Plain-text data and a chat template: the same warning line, or (--apply-chat-template) the same turns."""
    config = _config(_jsonl(tmp_path / "plain.jsonl", _rows(300, seed=4)), tmp_path, apply_chat_template=wrap,
                     max_length=256, max_prompt_length=128, eval_fraction=0.1)
    memory, memory_lines, streamed, lines = _both(config, chat_tokenizer, cache_dir=tmp_path / "cache")
    assert list(streamed.train) == memory.train and list(streamed.eval) == memory.eval
    assert lines[:-1] == memory_lines
    assert any(line.startswith("warning: 300 of 300 examples are plain text") for line in lines) == (not wrap)


def test_a_hub_data_set_is_streamed_not_downloaded(tmp_path, tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = _rows(150, seed=3)
    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, split, streaming))
        if not streaming:
            raise AssertionError("downloaded a data set that --streaming should stream")
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    lines: list[str] = []
    streamed = prepare_data(_config("org/prefs", tmp_path, streaming=True), "dpo", tokenizer, lines.append,
                            cache_dir=tmp_path / "cache")
    memory = prepare_data(_config(_jsonl(tmp_path / "same.jsonl", rows), tmp_path), "dpo", tokenizer,
                          use_cache=False, log=lambda line: None)
    assert [e.responses for e in streamed.train] == [e.responses for e in memory.train]
    first_line = int(memory.train[0].source.rsplit(":", 1)[1])  # 1-based line of the first kept row
    assert streamed.train[0].source == f"org/prefs[train] row {first_line - 1}"
    assert calls == [("org/prefs", "train", True)]
    assert any("not cached" in line for line in lines)


def test_bad_input_is_a_one_line_error_and_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    from dpokit.errors import DataError

    rows = _rows(1500)
    rows[1234] = {"prompt": "p", "chosen": 7, "rejected": "r"}
    cache = tmp_path / "cache"
    config = _config(_jsonl(tmp_path / "bad.jsonl", rows), tmp_path, streaming=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:1235: field 'chosen' must be a string, got int"):
        prepare_data(config, "dpo", tokenizer, lambda line: None, cache_dir=cache)
    assert list(cache.iterdir()) == []  # the shards of the first chunk were removed
    monkeypatch.setattr(streaming, "_feed", lambda *a: pytest.fail("tokenised before finding the eval file"))
    config = _config(_jsonl(tmp_path / "good.jsonl", rows[:1000]), tmp_path, streaming=True,
                     eval_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        prepare_data(config, "dpo", tokenizer, lambda line: None, cache_dir=cache)


def test_no_list_of_the_records_or_examples_is_built(tmp_path, tokenizer, monkeypatch):
    """Memory is bounded by the chunk: at every chunk at most two chunks' records (train and eval) are alive,
    and no TokenizedExample exists until training indexes one. The in-memory path, checked the same way, holds
    every record (so the count can tell)."""
    n, chunk = 900, 150
    data = _jsonl(tmp_path / "pairs.jsonl", _rows(n))
    monkeypatch.setattr(streaming, "CHUNK", chunk)
    alive = {"records": [], "examples": []}
    tokenize_chunk = tokenize_module._tokenize_chunk

    def counting(records, ctx, report):
        objects = gc.get_objects()
        alive["records"].append(sum(type(o) is PreferencePair for o in objects))
        alive["examples"].append(sum(type(o) is TokenizedExample for o in objects))
        return tokenize_chunk(records, ctx, report)

    monkeypatch.setattr(tokenize_module, "_tokenize_chunk", counting)
    gc.collect()
    before = sum(type(o) is TokenizedExample for o in gc.get_objects())  # whatever earlier tests left
    streamed = prepare_data(_config(data, tmp_path, eval_fraction=0.1, streaming=True), "dpo", tokenizer,
                            lambda line: None, cache_dir=tmp_path / "cache")
    gc.collect()
    assert len(alive["records"]) >= n // chunk and max(alive["records"]) <= 2 * chunk
    assert max(alive["examples"]) == before
    assert sum(type(o) is TokenizedExample for o in gc.get_objects()) == before
    assert len(streamed.train) > 200
    alive["records"].clear()
    prepare_data(_config(data, tmp_path, eval_fraction=0.1), "dpo", tokenizer, lambda line: None, use_cache=False)
    assert max(alive["records"]) >= n


def test_examples_across_shards_and_their_digest(tmp_path, tokenizer, monkeypatch):
    import dpokit.data.sharded as sharded

    records = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(_rows(500))]
    settings = tokenize_module.TokenizeConfig(max_length=128, max_prompt_length=32)
    writer = CacheWriter(tmp_path, "k", shard_tokens=1500)
    sink = writer.sink("train")
    report = FilterReport()
    examples = []
    for arrays in tokenize_arrays(records, tokenizer, settings, report, chunk_size=60):
        sink(arrays)
        examples += tokenize_module.examples_from_arrays(arrays)
    report.kept = len(examples)
    writer.finish(None, [], {"train": report})
    parts, _ = open_entry(writer.tmp, verify=True)
    lazy = parts["train"]
    assert len(lazy._shards) > 3 and list(lazy) == examples
    monkeypatch.setattr(sharded, "_BLOCK", 300)  # blocks smaller than a shard: the digest must not change
    assert len(list(lazy.blocks())) > len(lazy._shards)
    assert examples_digest(lazy) == examples_digest(examples)
    changed = examples[:7] + [TokenizedExample(examples[7].prompt_ids, examples[7].responses[::-1])] + examples[8:]
    assert examples_digest(changed) != examples_digest(examples)
    assert examples_digest(examples[:-1]) != examples_digest(examples)


def _train_rows(output: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(output / "metrics.jsonl")]


@pytest.mark.usefixtures("single_thread")
def test_streamed_training_and_its_resume_equal_the_in_memory_run(tmp_path, tiny_model_dir, sentiment_data, capsys):
    """Same metrics rows and final weights (bit for bit) for: the default path; --streaming; --streaming stopped
    at step 2 and resumed to step 4 with its shards tokenised again (--no-data-cache: temporary shards)."""
    common = dict(model=tiny_model_dir, data=sentiment_data["train"], eval_fraction=0.1, batch_size=4, max_steps=4,
                  eval_every=2, save_every=2, lr=1e-3, optimizer="adamw", warmup_steps=1, seed=3,
                  precompute_ref=True)
    runs = {"memory": {}, "streamed": {"streaming": True}}
    for name, options in runs.items():
        train_dpo(TrainConfig(**common, **options, output=str(tmp_path / name)))
    resumed = dict(common, streaming=True, data_cache=False, output=str(tmp_path / "resumed"))
    train_dpo(TrainConfig(**{**resumed, "max_steps": 2}))
    capsys.readouterr()
    train_dpo(TrainConfig(**resumed, resume=True))
    assert "checkpoint-000002 at step 2" in capsys.readouterr().out
    expected = _train_rows(tmp_path / "memory")
    assert [r["step"] for r in expected if r["split"] == "eval"] == [2, 4]
    weights = (tmp_path / "memory" / "final" / "model.safetensors").read_bytes()
    for name in ("streamed", "resumed"):
        assert _train_rows(tmp_path / name) == expected, name
        assert (tmp_path / name / "final" / "model.safetensors").read_bytes() == weights, name
