"""The data of a run: load, validate, split and tokenise it (cached on disk, or streamed into shards), with the
lines that report what was read and kept."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dpokit.config import TrainConfig
from dpokit.data import ColumnMap, load_completions, load_preferences, load_unpaired, split_eval
from dpokit.data.checks import glued_boundary_warning
from dpokit.data.tokenize import TokenizeConfig, TokenizedExample, tokenize_examples
from dpokit.data.vision import check_modalities, processor_of, tokenize_vision_examples
from dpokit.errors import ConfigError


def _columns(config: TrainConfig) -> ColumnMap:
    return ColumnMap(
        prompt=config.prompt_column, chosen=config.chosen_column, rejected=config.rejected_column,
        responses=config.responses_column, scores=config.scores_column, completion=config.completion_column,
    )


def tokenize_config(config: TrainConfig) -> TokenizeConfig:
    """The tokenisation settings of a training config."""
    return TokenizeConfig(config.max_length, config.max_prompt_length, config.truncation, config.on_filtered,
                          config.apply_chat_template, config.on_long_rows)


@dataclass
class PreparedData:
    """Tokenised training and evaluation examples: lists, or with --streaming lazy sequences over the shards
    on disk (dpokit.data.sharded.ShardedExamples)."""

    train: Sequence[TokenizedExample]
    eval: Sequence[TokenizedExample]
    # unpaired data (stage "kto"): whether each example's completion is desirable, in the examples' order
    train_labels: list[bool] | None = None
    eval_labels: list[bool] | None = None


def kept_labels(records: Sequence, examples: Sequence[TokenizedExample]) -> list[bool]:
    """The labels of the records that tokenisation kept: `examples` are those records, in order, less the
    filtered ones, and each keeps its record's (unique) source."""
    labels, j = [], 0
    for example in examples:
        while records[j].source != example.source:
            j += 1
        labels.append(records[j].label)
        j += 1
    return labels


def prepare_data(config: TrainConfig, stage: str, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print,
                 *, cache_dir: str | os.PathLike | None = None, use_cache: bool | None = None) -> PreparedData:
    """Load, validate, split and tokenise the data of `config` for `stage` ("dpo", "sft", or "kto": unpaired data,
    whose labels come back with the examples and which is never cached), reporting counts.

    The tokenised examples are cached on disk (see dpokit.data.cache) under a key of the raw data, tokenizer and
    every setting that decides the token ids: a later call with the same inputs reads them back instead of
    loading and tokenising again, and logs the same lines. `cache_dir` defaults to ``config.data_cache_dir``,
    else ``$DPOKIT_CACHE`` or ``~/.cache/dpokit/tokenized``; `use_cache` defaults to ``config.data_cache``.
    Only the process with LOCAL_RANK 0 writes entries. With ``config.streaming`` nothing is held in memory:
    see dpokit.data.streaming.
    """
    from dpokit.data.cache import open_cache

    settings = tokenize_config(config)
    vision = processor_of(tokenizer) is not None
    if vision and config.streaming:
        raise ConfigError("--streaming is not supported with a vision-language model: images are read into memory")
    if use_cache is None:
        use_cache = config.data_cache and stage != "kto" and not vision  # the cache keeps neither labels nor images
    if cache_dir is None:
        cache_dir = config.data_cache_dir
    if config.streaming:
        from dpokit.data.streaming import prepare_streamed

        return PreparedData(*prepare_streamed(config, stage, tokenizer, settings, _columns(config), log,
                                              cache_dir=cache_dir, use_cache=use_cache))
    cache = open_cache(config, stage, tokenizer, settings, _columns(config), cache_dir=cache_dir, log=log) \
        if use_cache else None
    if cache is not None:
        cached = cache.load(log)
        if cached is not None:
            for line in cached.log:
                log(line)
            log(f"tokenised data: reusing {cached.path}")
            return PreparedData(cached.examples["train"], cached.examples.get("eval", []))
    writer = cache.writer(log) if cache is not None and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 else None
    try:
        return _load_and_tokenize(config, stage, tokenizer, settings, log, cache, writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _load_and_tokenize(config: TrainConfig, stage: str, tokenizer: PreTrainedTokenizerBase,
                       settings: TokenizeConfig, log: Callable[[str], None], cache, writer) -> PreparedData:
    """The uncached path of :func:`prepare_data`: every line logged is also kept for the cache entry."""
    from dpokit.data.tokenize import release_freed_memory

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    records, eval_records = _load_records(config, stage, tokenizer, settings, say)
    check_modalities([*records, *eval_records], tokenizer, config.data)
    # pairs with images through the processor (never cached: writer is None then)
    tokenize = tokenize_vision_examples if processor_of(tokenizer) is not None else tokenize_examples
    train_examples, train_report = tokenize(records, tokenizer, settings, description="tokenising",
                                            sink=writer and writer.sink("train"))
    labels = kept_labels(records, train_examples) if stage == "kto" else None
    eval_labels = None
    del records
    say(f"tokenised training data: {train_report.summary()}")
    eval_examples: list[TokenizedExample] = []
    reports = {"train": train_report}
    if eval_records:
        eval_examples, reports["eval"] = tokenize(eval_records, tokenizer, settings, description="tokenising eval",
                                                  sink=writer and writer.sink("eval"))
        say(f"tokenised eval data: {reports['eval'].summary()}")
        eval_labels = kept_labels(eval_records, eval_examples) if stage == "kto" else None
    del eval_records
    if writer is not None:
        entry = writer.commit(cache.inputs, lines, reports)
        log(f"tokenised data: cached in {entry}" if entry else f"tokenised data: not cached ({writer.error})")
    release_freed_memory()  # the raw records and the tokenizer's output, freed
    if labels is not None:
        say(f"labels: {sum(labels)} desirable and {len(labels) - sum(labels)} undesirable training examples")
    return PreparedData(train_examples, eval_examples, labels, eval_labels)


def _load_records(config: TrainConfig, stage: str, tokenizer: PreTrainedTokenizerBase, settings: TokenizeConfig,
                  say: Callable[[str], None]) -> tuple[list, Sequence]:
    """The training and evaluation records of `config` for `stage`, with their counts and any warning said."""
    from dpokit.data.tokenize import plain_text_warning

    load = {"dpo": load_preferences, "sft": load_completions, "kto": load_unpaired}[stage]
    records, report = load(config.data, format=config.format, columns=_columns(config), split=config.split)
    say(f"data: {len(records)} examples from {config.data} ({report.format} format, {report.rows} rows"
        + "".join(f"; {n} {reason}" for reason, n in report.counts.items()) + ")")
    eval_records: Sequence = []
    if config.eval_data:
        eval_records, _ = load(config.eval_data, format=config.format, columns=_columns(config),
                               split=config.eval_split)
        say(f"eval data: {len(eval_records)} examples from {config.eval_data}")
    elif config.eval_fraction:
        records, eval_records = split_eval(records, config.eval_fraction, config.seed)
        say(f"eval data: {len(eval_records)} examples held out of {config.data} (seed {config.seed})")
    warning = plain_text_warning([*records, *eval_records], tokenizer, settings)
    if warning:
        say(warning)
    glued = None if config.apply_chat_template else glued_boundary_warning([*records, *eval_records])
    if glued:
        say(glued)
    return records, eval_records
