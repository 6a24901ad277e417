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

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LEGACY_COMMIT = "7a49e62"
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------------------------------------------
# inputs


def _zipf_text(seed: int, words: int) -> tuple[str, list[int]]:
    """One long text of `words` Zipf-distributed words, and the character offset where each word starts."""
    import numpy as np

    sys.path.insert(0, str(HERE))
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


def build_tokenizer(text: str, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.split(" ")
    tok.train_from_iterator((" ".join(lines[i : i + 60]) for i in range(0, min(len(lines), 480_000), 60)),
                            trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None)
    fast.save_pretrained(out)
    return fast


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
    tokenizer = build_tokenizer(text, args.vocab, work / "tokenizer")
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


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def child(spec: dict) -> dict:
    rss_start = _rss_mib()
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
    rss_import = _rss_mib()
    config = TrainConfig(model=spec["tokenizer"], data=spec["data"], output=spec["output"],
                         streaming=spec.get("streaming", False))
    marks: list[tuple[float, str]] = []
    load_before = _loadavg()
    cpu, start = _cpu_seconds(), time.perf_counter()

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
        "seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu, "examples": len(examples),
        "tokens": sum(e.length for e in examples), "marks": marks,
        "rss_start_mib": rss_start, "rss_after_import_mib": rss_import, "rss_after_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
    }


def child_tokenizer(spec: dict, tokenizer) -> dict:
    """The tokenizer alone: one batched call over the texts of the first `sample` pairs."""
    rows = []
    with open(spec["data"]) as f:
        for _, line in zip(range(spec["sample"]), f):
            rows.append(json.loads(line))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    load_before = _loadavg()
    cpu, start = _cpu_seconds(), time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu, "tokens": tokens, "texts": len(texts),
            "tokens_per_second": tokens / seconds, "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS")}


def run_child(spec: dict, work: Path, name: str, env_extra: dict | None = None) -> dict:
    spec_path, out_path = work / f"spec-{name}.json", work / f"result-{name}.json"
    spec = dict(spec, result=str(out_path), output=str(work / "out"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore",
               **(env_extra or {}))
    env.pop("TOKENIZERS_PARALLELISM", None)
    started = time.perf_counter()
    with (work / f"log-{name}.txt").open("w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=handle,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not out_path.exists():
        tail = (work / f"log-{name}.txt").read_text()[-4000:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"failed": True, "returncode": proc.returncode, "log_tail": tail}
    result = json.loads(out_path.read_text())
    result["child_wall_seconds"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------------------
# report


def _spread(xs, fmt="{:.1f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def _mark(result: dict, prefix: str) -> float | None:
    return next((t for t, line in result.get("marks", []) if line.startswith(prefix)), None)


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
                f"| {phases} | {_spread([r['peak_rss_mib'] for r in rs], '{:.0f}')} "
                f"| {_spread([r['rss_after_mib'] - r['rss_after_import_mib'] for r in rs], '{:.0f}')} "
                f"| {rs[0]['examples']:,} | {rs[0]['tokens'] / 1e6:.1f}M "
                f"| {_spread([max(r['loadavg_before'], r['loadavg_after']) for r in rs])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,50000,200000", help="pairs per data set (default 10k, 50k, 200k)")
    parser.add_argument("--legacy-sizes", default="10000,50000",
                        help="sizes also run with the pre-cache code (commit 7a49e62); '' for none. It keeps every "
                             "encoding in memory (~4.4 GB at 50k), so 200k is left out by default")
    parser.add_argument("--streaming-sizes", default="200000",
                        help="sizes (of --sizes) also run with --streaming, first and cached; '' for none")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every measurement once (default 2)")
    parser.add_argument("--cached-repeats", type=int, default=1,
                        help="cached runs per first run in each round, the in-memory and --streaming ones taking "
                             "turns (default 1): more samples of the cheap runs without paying for more first runs "
                             "(~4 min each at 200k on 2 idle cores)")
    parser.add_argument("--prompt-len", type=int, default=150, help="mean prompt tokens (default 150)")
    parser.add_argument("--response-len", type=int, default=250, help="mean response tokens (default 250)")
    parser.add_argument("--spread", type=float, default=0.2,
                        help="lengths uniform in mean x (1 ± spread) (default 0.2: nothing exceeds max_length 512)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokenizer-sample", type=int, default=3000, help="pairs in the tokenizer-alone timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the data, cache and logs here (default: a temporary directory)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON result")
    parser.add_argument("--quick", action="store_true", help="2k and 5k pairs, 1 round, pre-cache at 2k")
    args = parser.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return

    if args.quick:
        args.sizes, args.legacy_sizes, args.streaming_sizes, args.rounds = "2000,5000", "2000", "5000", 1
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.legacy_sizes = [int(s) for s in args.legacy_sizes.split(",") if s]
    args.streaming_sizes = [int(s) for s in args.streaming_sizes.split(",") if s and int(s) in args.sizes]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"building the tokenizer and {', '.join(map(str, sorted(set(args.sizes) | set(args.legacy_sizes))))} "
          f"pairs in {work} ...", flush=True)
    setup = build_inputs(args, work)
    print(f"  built in {setup['build_seconds']} s ({setup['tokens_per_word']} tokens per word)", flush=True)
    legacy_module = None
    if args.legacy_sizes:
        legacy_module = work / "legacy_tokenize.py"
        shown = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:src/dpokit/tokenize.py"], capture_output=True,
                               text=True, cwd=ROOT)
        if shown.returncode != 0:
            print(f"  no commit {LEGACY_COMMIT} here: the pre-cache runs are skipped", flush=True)
            args.legacy_sizes, legacy_module = [], None
        else:
            legacy_module.write_text(shown.stdout)

    results: dict[str, list] = {}
    base = {"tokenizer": setup["tokenizer"]}
    largest = setup["files"][max(args.sizes)]["path"]
    for rayon in ("1", "2"):
        name = f"tokenizer-{rayon}-thread"
        r = run_child(dict(base, system="tokenizer", data=largest, sample=args.tokenizer_sample), work, name,
                      {"RAYON_NUM_THREADS": rayon})
        results.setdefault(name, []).append(r)
        if not r.get("failed"):
            print(f"  tokenizer alone, {rayon} thread(s): {r['tokens'] / 1e6:.2f}M tokens in {r['seconds']:.1f} s "
                  f"({r['tokens_per_second'] / 1e6:.3f} M tokens/s, {r['cpu_seconds']:.1f} CPU s)", flush=True)
    for round_ in range(args.rounds):
        for n in args.sizes:
            modes = (False, True) if n in args.streaming_sizes else (False,)
            caches = {streaming: work / f"cache-{n}-{round_}{'-streamed' if streaming else ''}"
                      for streaming in modes}
            runs = [("first", streaming, "") for streaming in modes]
            # the cached runs of both modes take turns, so that they share the machine's load as it changes
            runs += [("cached", streaming, f"-{k}" if k else "") for k in range(args.cached_repeats)
                     for streaming in modes]
            for cache in caches.values():
                shutil.rmtree(cache, ignore_errors=True)
            for run, streaming, repeat in runs:
                run = f"streamed {run}" if streaming else run
                spec = dict(base, system="dpokit", data=setup["files"][n]["path"], cache_dir=str(caches[streaming]),
                            streaming=streaming)
                r = run_child(spec, work, f"{run.replace(' ', '-')}-{n}-{round_}{repeat}")
                results.setdefault(f"{run}-{n}", []).append(r)
                if not r.get("failed"):
                    print(f"  round {round_ + 1}: {n:>7,} pairs, {run:15}: {r['seconds']:6.1f} s, "
                          f"peak RSS {r['peak_rss_mib']:6.0f} MiB (load avg {r['loadavg_before']:.1f}–"
                          f"{r['loadavg_after']:.1f})", flush=True)
            for cache in caches.values():
                shutil.rmtree(cache, ignore_errors=True)
        for n in args.legacy_sizes:
            r = run_child(dict(base, system="pre-cache", data=setup["files"][n]["path"],
                               legacy_module=str(legacy_module)), work, f"pre-cache-{n}-{round_}")
            results.setdefault(f"pre-cache-{n}", []).append(r)
            if not r.get("failed"):
                print(f"  round {round_ + 1}: {n:>7,} pairs, pre-cache: {r['seconds']:6.1f} s, "
                      f"peak RSS {r['peak_rss_mib']:6.0f} MiB (load avg {r['loadavg_before']:.1f}–"
                      f"{r['loadavg_after']:.1f})", flush=True)

    markdown = table(results, args.sizes, args.legacy_sizes)
    tok_lines = []
    for rayon in ("1", "2"):
        r = results.get(f"tokenizer-{rayon}-thread", [{}])[0]
        if r and not r.get("failed"):
            tok_lines.append(f"tokenizer alone ({args.tokenizer_sample} pairs, one batched call, {rayon} thread(s)): "
                             f"{r['tokens_per_second'] / 1e6:.3f} M tokens/s, "
                             f"{r['tokens'] / r['cpu_seconds'] / 1e6:.3f} M tokens per CPU second")
    import tokenizers
    import transformers

    header = (f"dpokit data preparation: prompts ~{args.prompt_len} and responses ~{args.response_len} tokens "
              f"(x (1 ± {args.spread})), byte-level BPE vocabulary {args.vocab}, max_length 512; "
              f"{args.rounds} round(s), {args.cached_repeats} cached run(s) per first run, median (min–max); "
              f"{os.cpu_count()} CPUs, transformers "
              f"{transformers.__version__}, tokenizers {tokenizers.__version__}")
    print("\n" + header + "\n" + markdown + "\n\n" + "\n".join(tok_lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"data-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps({
        "args": vars(args), "setup": setup, "results": results, "table_markdown": markdown, "header": header,
        "tokenizer_alone": tok_lines, "wall_seconds": time.perf_counter() - began,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }, indent=1))
    print(f"\nresults: {path}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
