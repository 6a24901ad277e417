#!/usr/bin/env python
"""Data at scale: load, validate and tokenise 10k, 50k and 200k preference pairs, first run and cached run.

One command (see bench/README.md, "Data at scale"):

    python bench/bench_data.py             # 10k, 50k, 200k pairs, 2 rounds, plus the pre-cache code at 10k/50k
                                           # and --streaming at 200k
    python bench/bench_data.py --quick     # 2k and 5k pairs, 1 round: checks the harness (~2 min)

Everything is built locally from --seed: a byte-level BPE tokenizer (vocabulary 8192, ``<|endoftext|>`` as BOS,
EOS and padding, like bench/_setup.py) trained on text of Zipf-distributed words from a synthetic 6000-word
vocabulary, and JSON Lines files of ``prompt``/``chosen``/``rejected`` pairs whose prompts are ~150 tokens and
responses ~250 tokens (each uniform in mean x (1 ± --spread); text cut at word boundaries of one long Zipf
text, so every text is distinct and nothing is saved by deduplication).

Each measurement is a child process (``--child``) that imports dpokit, loads the tokenizer and times
``dpokit.api.prepare_data`` with the default TrainConfig settings (max_length 512, max_prompt_length 256):

* ``first``  with an empty cache directory: load + validate + tokenise + write the cache entry;
* ``cached`` the same call again in a new process: the entry is read back (nothing is loaded or tokenised);
* ``streamed first`` / ``streamed cached`` (``--streaming-sizes``): the same two calls with ``--streaming``
  (records read and tokenised chunk by chunk into the shards, examples read lazily from them; the cached call
  opens the entry and checks its checksums); each mode has its own cache directory, and with
  ``--cached-repeats K`` the cached calls of the two modes take turns K times after the first runs;
* ``pre-cache`` (``--legacy-sizes``) the code before this change (commit 7a49e62: ``load_preferences`` and its
  ``tokenize_examples``, which tokenised all texts in one call and kept every encoding), for comparison.

Measured: wall seconds of the call, CPU seconds of the process (all threads: the tokenizer runs on every core),
peak RSS (``ru_maxrss``) and the RSS still held afterwards (the examples) above the RSS after imports, the
seconds at which each logged line appeared (load, tokenise, cache write), and the load average of the machine
before and after (other work on a shared machine slows every number down). Reported: median (min–max) over
rounds. A separate child times the tokenizer alone (one batched call over a sample, 1 and 2 threads): the
floor under any first run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _harness import harness_parser, spread, write_result
from _setup import (add_length_options, build_tokenizer, cpu_seconds, loadavg, peak_rss_mib, quiet_environment,
                    rss_mib, run_child, serve_child, workdir)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LEGACY_COMMIT = "7a49e62"


# --------------------------------------------------------------------------------------------------------------
# inputs


def _zipf_text(seed: int, words: int) -> tuple[str, list[int]]:
    """One long text of `words` Zipf-distributed words, and the character offset where each word starts."""
    import numpy as np

    from _setup import _words

    rng = random.Random(seed)
    vocab = _words(rng, 6000)
    rng.shuffle(vocab)
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    picks = np.random.default_rng(seed).choice(len(vocab), size=words, p=weights / weights.sum())
    chosen = [vocab[i] for i in picks.tolist()]
    text = " ".join(chosen)
    starts = np.concatenate(([0], np.cumsum([len(w) + 1 for w in chosen])[:-1])).tolist()
    return text, starts


def write_pairs(path: Path, n: int, text: str, starts: list[int], tokens_per_word: float, args) -> dict:
    """`n` pairs cut from `text`; returns their mean lengths in words."""
    rng = random.Random(args.seed + n)
    last = len(starts) - 2000

    def piece(mean_tokens: int, space: bool) -> str:
        words = max(2, round(mean_tokens * rng.uniform(1 - args.spread, 1 + args.spread) / tokens_per_word))
        s = rng.randrange(last)
        return (" " if space else "") + text[starts[s] : starts[s + words] - 1]

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": piece(args.prompt_len, False), "chosen": piece(args.response_len, True),
                                "rejected": piece(args.response_len, True)}) + "\n")
    return {"pairs": n, "bytes": path.stat().st_size}


def build_inputs(args, work: Path) -> dict:
    started = time.perf_counter()
    text, starts = _zipf_text(args.seed, 3_000_000)
    lines = text.split(" ")
    corpus = (" ".join(lines[i : i + 60]) for i in range(0, min(len(lines), 480_000), 60))
    tokenizer = build_tokenizer(corpus, args.vocab, work / "tokenizer")
    sample = [text[starts[i] : starts[i + 200] - 1] for i in range(0, 200 * 300, 200)]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    tokens_per_word = sum(map(len, ids)) / (200 * len(sample))
    files = {}
    for n in sorted(set(args.sizes) | set(args.legacy_sizes)):
        path = work / f"pairs-{n}.jsonl"
        files[n] = {"path": str(path), **write_pairs(path, n, text, starts, tokens_per_word, args)}
    return {"tokenizer": str(work / "tokenizer"), "tokens_per_word": round(tokens_per_word, 4), "files": files,
            "build_seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------------------------------
# children


def child(spec: dict) -> dict:
    rss_start = rss_mib()
    from transformers import AutoTokenizer

    from dpokit.api import prepare_data
    from dpokit.config import TrainConfig

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["system"] == "tokenizer":
        return child_tokenizer(spec, tokenizer)
    legacy = None
    if spec["system"] == "pre-cache":
        import importlib.util

        from dpokit.data import load_preferences

        module = importlib.util.spec_from_file_location("legacy_tokenize", spec["legacy_module"])
        legacy = importlib.util.module_from_spec(module)
        sys.modules["legacy_tokenize"] = legacy  # dataclasses look their module up
        module.loader.exec_module(legacy)
    rss_import = rss_mib()
    config = TrainConfig(model=spec["tokenizer"], data=spec["data"], output=spec["output"],
                         streaming=spec.get("streaming", False))
    marks: list[tuple[float, str]] = []
    load_before = loadavg()
    cpu, start = cpu_seconds(), time.perf_counter()

    def log(line: str) -> None:
        marks.append((round(time.perf_counter() - start, 3), line))
        print(line, flush=True)

    if legacy is None:
        examples = prepare_data(config, "dpo", tokenizer, log, cache_dir=spec["cache_dir"]).train
    else:
        records, _ = load_preferences(spec["data"])
        log(f"data: {len(records)} examples")
        settings = legacy.TokenizeConfig(config.max_length, config.max_prompt_length, config.truncation,
                                         config.on_filtered)
        examples, report = legacy.tokenize_examples(records, tokenizer, settings)
        del records
        log(f"tokenised training data: {report.summary()}")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "examples": len(examples),
        "tokens": sum(e.length for e in examples), "marks": marks,
        "rss_start_mib": rss_start, "rss_after_import_mib": rss_import, "rss_after_mib": rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }


def child_tokenizer(spec: dict, tokenizer) -> dict:
    """The tokenizer alone: one batched call over the texts of the first `sample` pairs."""
    rows = []
    with open(spec["data"]) as f:
        for _, line in zip(range(spec["sample"]), f):
            rows.append(json.loads(line))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    load_before = loadavg()
    cpu, start = cpu_seconds(), time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "tokens": tokens, "texts": len(texts),
            "tokens_per_second": tokens / seconds, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS")}


def run(spec: dict, work: Path, name: str, rayon: str | None = None) -> dict:
    """One measurement in a child process (tokenizers on every core unless `rayon` threads are given)."""
    env = quiet_environment(drop=("TOKENIZERS_PARALLELISM",), **({"RAYON_NUM_THREADS": rayon} if rayon else {}))
    result = run_child(__file__, spec, work, name, env, failed="record", cwd=ROOT)
    if result.get("failed"):
        print(f"  {name}: FAILED (exit {result['returncode']})\n{result['log_tail'][-4000:]}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------------------
# report


def _mark(result: dict, prefix: str) -> float | None:
    return next((t for t, line in result.get("marks", []) if line.startswith(prefix)), None)


def _spread(xs) -> str:
    return spread(xs, "{:.1f}")


def table(results: dict, sizes: list[int], legacy_sizes: list[int]) -> str:
    lines = ["| pairs | run | seconds | CPU seconds | load / tokenise / cache write s | peak RSS MiB | "
             "held after MiB | examples | tokens | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(set(sizes) | set(legacy_sizes)):
        for run in ("first", "cached", "streamed first", "streamed cached", "pre-cache"):
            rs = [r for r in results.get(f"{run}-{n}", []) if not r.get("failed")]
            if not rs:
                continue
            phases = "–"
            if run in ("first", "pre-cache"):  # (a streamed run logs its counts at the end)
                load = [_mark(r, "data:") for r in rs]
                tok = [(_mark(r, "tokenised training") or 0) - (_mark(r, "data:") or 0) for r in rs]
                write = [r["seconds"] - _mark(r, "tokenised training") for r in rs] if run == "first" else []
                phases = f"{_spread(load)} / {_spread(tok)} / {_spread(write) if write else '–'}"
            lines.append(
                f"| {n:,} | {run} | {_spread([r['seconds'] for r in rs])} | {_spread([r['cpu_seconds'] for r in rs])} "
                f"| {phases} | {spread([r['peak_rss_mib'] for r in rs], '{:.0f}')} "
                f"| {spread([r['rss_after_mib'] - r['rss_after_import_mib'] for r in rs], '{:.0f}')} "
                f"| {rs[0]['examples']:,} | {rs[0]['tokens'] / 1e6:.1f}M "
                f"| {_spread([max(r['loadavg_before'], r['loadavg_after']) for r in rs])} |")
    return "\n".join(lines)


def parse_args():
    parser = harness_parser(__doc__, rounds=2, rounds_help="rounds; each runs every measurement once (default 2)",
                            workdir=False, quick="2k and 5k pairs, 1 round, pre-cache at 2k")
    parser.add_argument("--sizes", default="10000,50000,200000", help="pairs per data set (default 10k, 50k, 200k)")
    parser.add_argument("--legacy-sizes", default="10000,50000",
                        help="sizes also run with the pre-cache code (commit 7a49e62); '' for none. It keeps every "
                             "encoding in memory (~4.4 GB at 50k), so 200k is left out by default")
    parser.add_argument("--streaming-sizes", default="200000",
                        help="sizes (of --sizes) also run with --streaming, first and cached; '' for none")
    parser.add_argument("--cached-repeats", type=int, default=1,
                        help="cached runs per first run in each round, the in-memory and --streaming ones taking "
                             "turns (default 1): more samples of the cheap runs without paying for more first runs "
                             "(~4 min each at 200k on 2 idle cores)")
    add_length_options(parser, prompt_len=150, response_len=250, spread=0.2, eos=False,
                       spread_help=": nothing exceeds max_length 512")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokenizer-sample", type=int, default=3000, help="pairs in the tokenizer-alone timing")
    parser.add_argument("--workdir", help="keep the data, cache and logs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.child:
        return args
    if args.quick:
        args.sizes, args.legacy_sizes, args.streaming_sizes, args.rounds = "2000,5000", "2000", "5000", 1
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.legacy_sizes = [int(s) for s in args.legacy_sizes.split(",") if s]
    args.streaming_sizes = [int(s) for s in args.streaming_sizes.split(",") if s and int(s) in args.sizes]
    return args


def legacy_module(args, work: Path) -> Path | None:
    """The pre-cache tokenisation code (LEGACY_COMMIT) as a file in `work`; None (and no pre-cache runs) without it."""
    if not args.legacy_sizes:
        return None
    shown = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:src/dpokit/tokenize.py"], capture_output=True, text=True,
                           cwd=ROOT)
    if shown.returncode != 0:
        print(f"  no commit {LEGACY_COMMIT} here: the pre-cache runs are skipped", flush=True)
        args.legacy_sizes = []
        return None
    (work / "legacy_tokenize.py").write_text(shown.stdout)
    return work / "legacy_tokenize.py"


def _print_run(round_: int, n: int, run_name: str, r: dict) -> None:
    if not r.get("failed"):
        print(f"  round {round_ + 1}: {n:>7,} pairs, {run_name:15}: {r['seconds']:6.1f} s, peak RSS "
              f"{r['peak_rss_mib']:6.0f} MiB (load avg {r['loadavg_before']:.1f}–{r['loadavg_after']:.1f})", flush=True)


def measure_round(args, setup: dict, work: Path, legacy: Path | None, round_: int, results: dict) -> None:
    """Every size's first and cached runs (in memory and, where asked, streamed), then the pre-cache runs."""
    base = {"tokenizer": setup["tokenizer"]}
    for n in args.sizes:
        modes = (False, True) if n in args.streaming_sizes else (False,)
        caches = {streaming: work / f"cache-{n}-{round_}{'-streamed' if streaming else ''}" for streaming in modes}
        runs = [("first", streaming, "") for streaming in modes]
        # the cached runs of both modes take turns, so that they share the machine's load as it changes
        runs += [("cached", streaming, f"-{k}" if k else "") for k in range(args.cached_repeats) for streaming in modes]
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
        for kind, streaming, repeat in runs:
            kind = f"streamed {kind}" if streaming else kind
            spec = dict(base, system="dpokit", data=setup["files"][n]["path"], cache_dir=str(caches[streaming]),
                        streaming=streaming)
            r = run(spec, work, f"{kind.replace(' ', '-')}-{n}-{round_}{repeat}")
            results.setdefault(f"{kind}-{n}", []).append(r)
            _print_run(round_, n, kind, r)
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
    for n in args.legacy_sizes:
        r = run(dict(base, system="pre-cache", data=setup["files"][n]["path"], legacy_module=str(legacy)), work,
                f"pre-cache-{n}-{round_}")
        results.setdefault(f"pre-cache-{n}", []).append(r)
        _print_run(round_, n, "pre-cache", r)


def tokenizer_alone(args, setup: dict, work: Path, results: dict) -> list[str]:
    """The tokenizer alone on 1 and 2 threads (results under tokenizer-N-thread); the lines that report it."""
    largest = setup["files"][max(args.sizes)]["path"]
    lines = []
    for rayon in ("1", "2"):
        name = f"tokenizer-{rayon}-thread"
        r = run({"tokenizer": setup["tokenizer"], "system": "tokenizer", "data": largest,
                 "sample": args.tokenizer_sample}, work, name, rayon)
        results[name] = [r]
        if not r.get("failed"):
            print(f"  tokenizer alone, {rayon} thread(s): {r['tokens'] / 1e6:.2f}M tokens in {r['seconds']:.1f} s "
                  f"({r['tokens_per_second'] / 1e6:.3f} M tokens/s, {r['cpu_seconds']:.1f} CPU s)", flush=True)
            lines.append(f"tokenizer alone ({args.tokenizer_sample} pairs, one batched call, {rayon} thread(s)): "
                         f"{r['tokens_per_second'] / 1e6:.3f} M tokens/s, "
                         f"{r['tokens'] / r['cpu_seconds'] / 1e6:.3f} M tokens per CPU second")
    return lines


def main() -> None:
    args = parse_args()
    if args.child:
        return serve_child(args.child, child)
    began = time.perf_counter()
    with workdir(args, "dpokit-bench-data-") as work:
        print(f"building the tokenizer and {', '.join(map(str, sorted(set(args.sizes) | set(args.legacy_sizes))))} "
              f"pairs in {work} ...", flush=True)
        setup = build_inputs(args, work)
        print(f"  built in {setup['build_seconds']} s ({setup['tokens_per_word']} tokens per word)", flush=True)
        legacy = legacy_module(args, work)
        results: dict[str, list] = {}
        tok_lines = tokenizer_alone(args, setup, work, results)
        for round_ in range(args.rounds):
            measure_round(args, setup, work, legacy, round_, results)
    markdown = table(results, args.sizes, args.legacy_sizes)
    import tokenizers
    import transformers

    header = (f"dpokit data preparation: prompts ~{args.prompt_len} and responses ~{args.response_len} tokens "
              f"(x (1 ± {args.spread})), byte-level BPE vocabulary {args.vocab}, max_length 512; "
              f"{args.rounds} round(s), {args.cached_repeats} cached run(s) per first run, median (min–max); "
              f"{os.cpu_count()} CPUs, transformers "
              f"{transformers.__version__}, tokenizers {tokenizers.__version__}")
    print("\n" + header + "\n" + markdown + "\n\n" + "\n".join(tok_lines))
    path = write_result(args, "data-", {"setup": setup, "results": results, "table_markdown": markdown,
                                        "header": header, "tokenizer_alone": tok_lines}, began)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
