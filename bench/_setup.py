"""Building the benchmark's inputs: the byte-level BPE tokenizer, the random Llama model and the preference data,
the command-line options of their shape that the benchmark scripts share, and the allocator each child runs on."""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
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


def build_tokenizer(sample, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(sample(60)) for _ in range(8000)]
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


def add_shape_options(parser, *, prompt_len: int = 200, response_len: int = 120, hidden: int = 256, layers: int = 4,
                      heads: int = 4, intermediate: int | None = None) -> None:
    """The options of the model's and the data's shape that :func:`build_everything` reads (--prompt-len to
    --intermediate; --max-length and --pairs stay with each script), with a script's defaults."""
    parser.add_argument("--prompt-len", type=int, default=prompt_len, help=f"mean prompt tokens (default {prompt_len})")
    parser.add_argument("--response-len", type=int, default=response_len,
                        help=f"mean response tokens incl. EOS (default {response_len})")
    parser.add_argument("--spread", type=float, default=0.3, help="lengths uniform in mean x (1 ± spread)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    width = "4 x hidden" if intermediate is None else f"{intermediate} = {intermediate / hidden:g} x hidden"
    parser.add_argument("--intermediate", type=int, default=intermediate, help=f"MLP width (default {width})")
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
    tokenizer = build_tokenizer(sample, args.vocab, model_dir)

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


def free_port() -> int:
    """A TCP port that is free on this machine now (the rendezvous port of a multi-process launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                           HF_DATASETS_CACHE=str(work / "hf_datasets_cache"), TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
                           TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    return environment


def _allocator(environment) -> str:
    """The malloc of a child started in `environment`: a library preloaded through LD_PRELOAD (e.g. jemalloc),
    else glibc's, with jemalloc's MALLOC_CONF and mimalloc's MIMALLOC_* settings when set."""
    settings = [f"{k}={v}" for k, v in sorted(environment.items()) if k == "MALLOC_CONF" or k.startswith("MIMALLOC_")]
    return (environment.get("LD_PRELOAD") or "glibc malloc") + (f" ({', '.join(settings)})" if settings else "")


def allocators(systems, malloc: str) -> dict:
    """Each system's allocator (`_allocator`) under `--malloc`."""
    return {name: _allocator(child_environment(name, malloc)) for name in systems}
