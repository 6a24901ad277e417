"""The setup every benchmark shares: its inputs (the byte-level BPE tokenizer, the random Llama model and the
preference data, and the command-line options of their shape) and its child processes (their environment and
allocator, starting one and reading its result, and inside it: threads, the import mark, memory measurement)."""

from __future__ import annotations

import importlib
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

EOT = "<|endoftext|>"


def _words(rng: random.Random, count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return sorted(words)


def _zipf_sampler(rng: random.Random, words: list[str]):
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
    order = words[:]
    rng.shuffle(order)

    def sample(n: int) -> list[str]:
        return rng.choices(order, weights=weights, k=n)

    return sample


def build_tokenizer(corpus, vocab_size: int, out: Path):
    """A byte-level BPE tokenizer of `vocab_size` trained on the texts of `corpus`, `<|endoftext|>` as BOS, EOS and
    padding, saved in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None)
    fast.save_pretrained(out)
    return fast


def text_of_tokens(tokenizer, sample, n: int, leading_space: bool) -> str:
    """Text that the tokenizer encodes into exactly (or, rarely, about) `n` tokens."""
    text = (" " if leading_space else "") + " ".join(sample(n + 8))
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    text = text[: enc.offsets[n - 1][1]]
    return text


def add_length_options(parser, *, prompt_len: int = 200, response_len: int = 120, spread: float = 0.3,
                       spread_help: str = "", eos: bool = True) -> None:
    """--prompt-len, --response-len, --spread: the lengths of the generated pairs, with a script's defaults."""
    parser.add_argument("--prompt-len", type=int, default=prompt_len, help=f"mean prompt tokens (default {prompt_len})")
    parser.add_argument("--response-len", type=int, default=response_len,
                        help=f"mean response tokens{' incl. EOS' if eos else ''} (default {response_len})")
    parser.add_argument("--spread", type=float, default=spread,
                        help=f"lengths uniform in mean x (1 ± spread) (default {spread}{spread_help})")


def add_model_options(parser, *, hidden: int = 256, layers: int = 4, heads: int = 4,
                      intermediate: int | None = None) -> None:
    """--hidden, --layers, --heads, --intermediate: the random Llama's shape, with a script's defaults."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    width = "4 x hidden" if intermediate is None else f"{intermediate} = {intermediate / hidden:g} x hidden"
    parser.add_argument("--intermediate", type=int, default=intermediate, help=f"MLP width (default {width})")


def add_shape_options(parser, *, prompt_len: int = 200, response_len: int = 120, hidden: int = 256, layers: int = 4,
                      heads: int = 4, intermediate: int | None = None) -> None:
    """The options of the model's and the data's shape that :func:`build_everything` reads (--prompt-len to
    --intermediate; --max-length and --pairs stay with each script), with a script's defaults."""
    add_length_options(parser, prompt_len=prompt_len, response_len=response_len)
    parser.add_argument("--vocab", type=int, default=8192)
    add_model_options(parser, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
    parser.add_argument("--sliding-window", type=int, default=None, metavar="N",
                        help="a Mistral of the same shape whose layers attend within N tokens (default: a Llama)")


def random_llama(*, vocab: int, hidden: int, max_positions: int, layers: int = 4, heads: int = 4,
                 intermediate: int | None = None, seed: int = 0, sliding_window: int | None = None, **config):
    """A LlamaForCausalLM of random weights (torch seeded with `seed` first): `layers` layers, `heads` heads (as
    many key/value heads), MLP `intermediate` wide (default 4 x hidden); with a `sliding_window`, the Mistral of
    that shape (a Llama whose layers attend within the window); `config`: further config fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                 max_position_embeddings=max_positions, **config)
    torch.manual_seed(seed)
    if sliding_window is not None:
        return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **shape))
    return LlamaForCausalLM(LlamaConfig(**shape))


def build_everything(args, work: Path) -> dict:
    """Tokenizer, model (saved), preference data (JSONL + TRL-ordered JSONL); returns a description."""
    import torch

    rng = random.Random(args.seed)
    sample = _zipf_sampler(rng, _words(rng, 6000))
    model_dir = work / "model"
    tokenizer = build_tokenizer([" ".join(sample(60)) for _ in range(8000)], args.vocab, model_dir)

    model = random_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                         intermediate=args.intermediate, max_positions=max(1024, args.max_length), seed=args.seed,
                         sliding_window=getattr(args, "sliding_window", None),
                         tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         attention_dropout=0.0).to(torch.float32)
    config, arch = model.config, type(model).__name__
    model.save_pretrained(model_dir, safe_serialization=True)
    params = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(params.values())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    del model

    def length(mean: int) -> int:
        return max(4, round(mean * rng.uniform(1 - args.spread, 1 + args.spread)))

    rows = []
    for i in range(args.pairs):
        p = length(args.prompt_len)
        # the response lengths include the EOS token that both libraries append
        c, r = length(args.response_len) - 1, length(args.response_len) - 1
        rows.append({
            "prompt": text_of_tokens(tokenizer, sample, p, leading_space=False),
            "chosen": text_of_tokens(tokenizer, sample, c, leading_space=True),
            "rejected": text_of_tokens(tokenizer, sample, r, leading_space=True),
        })
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Token lengths as dpokit tokenises them (and check that nothing is filtered or truncated)
    from dpokit.api import prepare_data
    from dpokit.config import TrainConfig

    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(work / "probe"), max_length=args.max_length,
                      max_prompt_length=min(args.max_length - 1, 256 if args.max_length > 256 else args.max_length // 2))
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train
    if len(examples) != len(rows):
        raise SystemExit(f"dpokit kept {len(examples)} of {len(rows)} pairs; lengths exceed --max-length?")
    prompt_lens = [len(e.prompt_ids) for e in examples]
    resp_lens = [len(r) for e in examples for r in e.responses]
    if max(p + max(map(len, e.responses)) for p, e in zip(prompt_lens, examples)) > args.max_length:
        raise SystemExit("a sequence exceeds --max-length")

    # TRL reads the rows in the order dpokit's trainer visits them in epoch 0 (its sampler is made sequential)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    (work / "pairs_trl_order.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))

    def stats(xs):
        return {"mean": round(statistics.mean(xs), 1), "min": min(xs), "max": max(xs)}

    return {
        "model_dir": str(model_dir), "data": str(data), "data_trl": str(work / "pairs_trl_order.jsonl"),
        "max_prompt_length": cfg.max_prompt_length,
        "model": {"arch": f"{arch} (random init)",
                  "sliding_window": getattr(config, "sliding_window", None), "vocab": args.vocab, "tokenizer_vocab": len(tokenizer),
                  "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "intermediate": config.intermediate_size, "tied_embeddings": False,
                  "params_total": total, "params_embedding": embed, "params_lm_head": head,
                  "params_decoder_layers": total - embed - head},
        "data_stats": {"pairs": len(rows), "prompt_tokens": stats(prompt_lens),
                       "response_tokens_incl_eos": stats(resp_lens),
                       # what a reference precompute scores: every sequence, its prompt counted once per response
                       "sequence_tokens": sum(p * len(e.responses) for p, e in zip(prompt_lens, examples))
                       + sum(resp_lens)},
    }


def describe(setup: dict) -> str:
    """One line on the model and the data :func:`build_everything` built."""
    m = setup["model"]
    return (f"model: {m['params_total'] / 1e6:.2f}M parameters ({m['params_decoder_layers'] / 1e6:.2f}M in decoder "
            f"layers, {m['params_lm_head'] / 1e6:.2f}M LM head, {m['params_embedding'] / 1e6:.2f}M embedding; hidden "
            f"{m['hidden']}, {m['layers']} layers, MLP {m['intermediate']}, vocab {m['vocab']}); "
            f"data: {json.dumps(setup['data_stats'])}")


def build_inputs(args, work: Path) -> dict:
    """:func:`build_everything` in `work`, saying so and describing what it built."""
    print(f"building tokenizer, model and data in {work} ...", flush=True)
    setup = build_everything(args, work)
    print(describe(setup), flush=True)
    return setup


@contextmanager
def workdir(args, prefix: str):
    """--workdir (created, kept) or a temporary directory (deleted at the end)."""
    work = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not getattr(args, "workdir", None):
            shutil.rmtree(work, ignore_errors=True)


def child_spec(setup: dict, args, **fields) -> dict:
    """What every training child reads: the model, the data (dpokit's and TRL's order), the batch and run shape."""
    return {"model_dir": setup["model_dir"], "data": setup["data"], "data_trl": setup["data_trl"],
            "batch_size": args.batch_size, "max_length": args.max_length,
            "max_prompt_length": setup["max_prompt_length"], "steps": args.steps, "threads": args.threads,
            "seed": args.seed, **fields}


def free_port() -> int:
    """A TCP port that is free on this machine now (the rendezvous port of a multi-process launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# child processes: the parent's side


QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore",
         "TQDM_DISABLE": "1"}


def quiet_environment(base=None, *, threads: int | None = None, drop=(), **extra) -> dict:
    """A child's environment: `base` (default: this process's) with the offline hub and no progress bars or
    advisory warnings, with `threads` OpenMP/MKL threads and the tokenizers' own threads off when given, without
    the variables in `drop`, and with `extra`."""
    env = dict(os.environ if base is None else base, **QUIET)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    for name in drop:
        env.pop(name, None)
    env.update(extra)
    return env


def add_malloc_option(parser) -> None:
    """--malloc: which allocator the children run on (`child_environment`)."""
    parser.add_argument("--malloc", choices=("as-shipped", "inherit"), default="as-shipped",
                        help="as-shipped (default): dpokit's children run on the allocator the dpokit command "
                             "chooses (mimalloc or jemalloc when found; dpokit.runtime.memory), TRL's on the "
                             "environment's; inherit: every child on the environment's")


def child_environment(name: str, malloc: str, threads: int | None = None, work: Path | None = None) -> dict:
    """The environment of system `name`'s child. With ``--malloc as-shipped`` a dpokit child gets the allocator
    the ``dpokit`` command would run on (dpokit.runtime.memory: mimalloc or jemalloc when found, unless
    DPOKIT_MALLOC=system or one is preloaded already); TRL's children, like TRL, run on what the environment has.
    With `threads` and `work`: also the thread counts, a datasets cache in `work`, offline hub, no progress bars
    or advisory warnings."""
    from dpokit.runtime.memory import malloc_environment

    shipped = malloc_environment(os.environ) if malloc == "as-shipped" and name.startswith("dpokit") else None
    environment = shipped or dict(os.environ)
    if threads is not None and work is not None:
        environment = quiet_environment(environment, threads=threads, HF_DATASETS_CACHE=str(work / "hf_datasets_cache"))
    return environment


def run_child(script: str, spec: dict, work: Path, tag: str, env: dict, *, failed: str = "raise",
              output: bool = True, cwd: Path | None = None) -> dict:
    """Run `script --child SPEC` in a process of its own with `env`: the spec (with `result` and, with `output`, an
    `output` directory, deleted afterwards) in work/spec_TAG.json, its log in work/log_TAG.txt. Returns the result
    the child wrote, with its wall seconds; for a child that failed, SystemExit with the log's tail
    (``failed="raise"``) or a result {"failed": True, "returncode", "log_tail"} (``failed="record"``)."""
    out_path, log = work / f"result_{tag}.json", work / f"log_{tag}.txt"
    spec = dict(spec, result=str(out_path), **({"output": str(work / f"run_{tag}")} if output else {}))
    if output:
        shutil.rmtree(spec["output"], ignore_errors=True)  # left by an interrupted earlier run in the same workdir
    spec_path = work / f"spec_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, script, "--child", str(spec_path)], stdout=handle,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd)
    seconds = time.perf_counter() - started
    if output:
        shutil.rmtree(spec["output"], ignore_errors=True)
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text(errors="replace")[-6000:]
        if failed == "raise":
            raise SystemExit(f"{tag} failed with exit code {proc.returncode}; log tail:\n{tail[-4000:]}")
        return {"failed": True, "returncode": proc.returncode, "log_tail": tail, "child_wall_seconds": seconds}
    return dict(json.loads(out_path.read_text()), child_wall_seconds=seconds)


# The parent of one measured process: its wall time from start to exit and its peak RSS (ru_maxrss of the
# processes it waited for: the command, after any exec of itself, and the descendants that command waited for),
# written to the file named by its first argument
WHOLE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[2:]); "
         "s = time.perf_counter() - t; open(sys.argv[1], 'w').write(json.dumps({'seconds': s, 'returncode': "
         "r.returncode, 'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss})); "
         "sys.exit(r.returncode)")


def whole_process(command: list[str], env: dict, log: Path | None = None, cwd: Path | None = None) -> dict:
    """Run `command` as a whole process under a small parent of its own that measures it as a user's stopwatch and
    `top` see it: {"seconds" (start to exit, the parent's own start excluded), "peak_rss_mib", "returncode",
    "output"}; its stdout and stderr go to `log` (a path) or are captured, and either way end up in "output"."""
    with tempfile.TemporaryDirectory(prefix="dpokit-whole-") as tmp:
        measured = Path(tmp) / "measured.json"
        handle = log.open("w") if log else None
        try:
            proc = subprocess.run([sys.executable, "-c", WHOLE, str(measured), *command], env=env, cwd=cwd,
                                  stdout=handle or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        finally:
            if handle:
                handle.close()
        done = json.loads(measured.read_text()) if measured.exists() else {}
    return {"seconds": done.get("seconds"), "returncode": done.get("returncode", proc.returncode),
            "peak_rss_mib": done["peak_rss_kib"] / 1024 if done.get("peak_rss_kib") else None,
            "output": log.read_text(errors="replace") if log else proc.stdout}


def system_runner(script: str, systems: dict, base: dict, args, work: Path, failed: str = "raise"):
    """run(name, round_) for the rounds of a script whose systems are name -> (kind, options): system `name`'s
    child (:func:`run_child` of `script` with the spec `base` and its kind and options), in its environment."""
    def run(name: str, round_: int) -> dict:
        kind, options = systems[name]
        return run_child(script, dict(base, kind=kind, options=options), work, f"{name}_{round_}",
                         child_environment(name, args.malloc, args.threads, work), failed=failed)

    return run


def serve_child(spec_path: str, children, key: str = "kind") -> None:
    """The child's side of :func:`run_child`: run ``children[spec[key]](spec)`` (or ``children(spec)``, a
    function) and write its result."""
    spec = json.loads(Path(spec_path).read_text())
    child = children if callable(children) else children[spec[key]]
    Path(spec["result"]).write_text(json.dumps(child(spec)))


def start_busy(count: int, seconds: float) -> list[subprocess.Popen]:
    """`count` processes that keep one CPU busy each for at most `seconds` (background load; :func:`stop` them)."""
    code = f"import time\nend = time.time() + {seconds:.0f}\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    if procs:
        time.sleep(1.0)  # let them reach the CPU before the measured run starts
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill and reap the given processes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


# --------------------------------------------------------------------------------------------------------------
# child processes: inside one (memory from Linux /proc; ru_maxrss as fallback)


def proc_status(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """Current resident set size, MiB."""
    return proc_status("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size of this process over its lifetime, MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_hwm() -> bool:
    """Reset the VmHWM high-water mark (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU seconds of this process so far, user and system, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def start_child(threads: int | None, *imports: str) -> dict:
    """The start of a measuring child: the RSS it started with, torch with `threads` threads, the modules in
    `imports` imported (``"module"`` or ``"module:attribute"``: their memory counts as imports), and the RSS after
    them. Call it first thing; returns {"rss_start_mib", "rss_after_import_mib"}."""
    marks = {"rss_start_mib": rss_mib()}
    import torch

    if threads:
        torch.set_num_threads(threads)
    for name in imports:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
    marks["rss_after_import_mib"] = rss_mib()
    return marks


def _allocator(environment) -> str:
    """The malloc of a child started in `environment`: a library preloaded through LD_PRELOAD (e.g. jemalloc),
    else glibc's, with jemalloc's MALLOC_CONF and mimalloc's MIMALLOC_* settings when set."""
    settings = [f"{k}={v}" for k, v in sorted(environment.items()) if k == "MALLOC_CONF" or k.startswith("MIMALLOC_")]
    return (environment.get("LD_PRELOAD") or "glibc malloc") + (f" ({', '.join(settings)})" if settings else "")


def allocators(systems, malloc: str) -> dict:
    """Each system's allocator (`_allocator`) under `--malloc`."""
    return {name: _allocator(child_environment(name, malloc)) for name in systems}
