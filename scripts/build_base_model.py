#!/usr/bin/env python
"""Build dpokit's embedded default model: a tiny Llama-style causal LM pretrained on generated reviews.

Reproducible from the seed (deterministic corpus, torch.manual_seed, one thread count):

    python scripts/build_base_model.py --seed 0 --steps 900 --threads 2

Steps:
1. generate a movie-review corpus with :func:`dpokit.experiments.reviews.generate_reviews` (no downloaded data);
2. train a byte-level BPE tokenizer (``tokenizers``) with ``<|endoftext|>`` as BOS/EOS/PAD;
3. pretrain a ``LlamaForCausalLM`` (tied embeddings) on packed ``text<|endoftext|>`` documents;
   every training row starts at a review start, so the model continues a prompt with or without a
   leading ``<|endoftext|>``; the tokenizer adds no special tokens by itself;
4. save safetensors weights, tokenizer and generation config to ``src/dpokit/assets/base`` with a
   ``build_info.json`` (seed, steps, loss, size, timing, sentiment mix of sampled continuations of
   neutral prefixes as scored by VADER, and a few samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dpokit.experiments.reviews import generate_reviews, review_prefixes  # noqa: E402

EOT = "<|endoftext|>"


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def pack(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Rows of ``seq_len`` tokens; each row starts at a document start (the row's last document is cut)."""
    rows, buf = [], []
    for d in docs:
        buf.extend(d)
        if len(buf) >= seq_len:
            rows.append(buf[:seq_len])
            buf = []
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 50) -> list[str]:
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    outs = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--output", default=str(ROOT / "src" / "dpokit" / "assets" / "base"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=200)
    args = p.parse_args(argv)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. corpus and tokenizer
    tok_texts = generate_reviews(20_000, seed=args.seed * 1000 + 1)
    tokenizer = build_tokenizer(tok_texts, args.vocab_size)
    eos = tokenizer.eos_token_id
    avg_tokens = sum(len(tokenizer.encode(t)) for t in tok_texts[:2000]) / 2000 + 1
    n_docs = int(args.steps * args.batch_size * args.seq_len / avg_tokens * 1.3) + 1000
    texts = generate_reviews(n_docs, seed=args.seed * 1000 + 2)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    data = pack([d + [eos] for d in ids], args.seq_len)
    n_rows = len(data)
    print(f"corpus: {n_docs} reviews, {n_rows} rows of {args.seq_len} tokens, vocab {len(tokenizer)}", flush=True)

    # 3. model
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_rows, generator=g)
    model.train()
    losses = []
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5)
    for step in bar:
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % n_rows]
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    train_s = time.time() - t_train
    final_loss = sum(losses[-20:]) / len(losses[-20:])
    print(f"trained {args.steps} steps in {train_s:.0f}s, final loss {final_loss:.3f}", flush=True)

    # held-out loss on fresh reviews
    model.eval()
    held = generate_reviews(300, seed=args.seed * 1000 + 3)
    hid = tokenizer(held, add_special_tokens=False)["input_ids"]
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for d in hid:
            x = torch.tensor([d + [eos]])
            tot += model(input_ids=x, labels=x).loss.item() * (x.shape[1] - 1)
            cnt += x.shape[1] - 1
    heldout_loss = tot / cnt
    print(f"held-out loss {heldout_loss:.3f} nats/token (uniform {math.log(len(tokenizer)):.2f})", flush=True)

    # 4. sentiment mix of continuations of neutral prefixes
    analyzer = SentimentIntensityAnalyzer()
    prompts = review_prefixes(args.eval_samples, seed=args.seed * 1000 + 4, tokenizer=tokenizer)
    conts = sample(model, tokenizer, prompts, max_new_tokens=40, seed=args.seed)
    scores = [analyzer.polarity_scores(c)["compound"] for c in conts]
    pos_share = sum(s > 0.05 for s in scores) / len(scores)
    neg_share = sum(s < -0.05 for s in scores) / len(scores)
    print(f"continuations of {len(prompts)} neutral prefixes: {pos_share:.0%} positive, {neg_share:.0%} negative", flush=True)
    samples = [{"prompt": pr, "continuation": c, "vader": round(s, 3)} for pr, c, s in zip(prompts, conts, scores)][:5]
    for s in samples:
        print(f"  [{s['vader']:+.2f}] {s['prompt']}|{s['continuation']}")

    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, max_length=256)
    model.save_pretrained(out)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    size = (out / "model.safetensors").stat().st_size
    info = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "threads": args.threads,
        "final_train_loss": round(final_loss, 4),
        "heldout_loss": round(heldout_loss, 4),
        "uniform_loss": round(math.log(len(tokenizer)), 4),
        "params": n_params,
        "weights_bytes": size,
        "vocab_size": len(tokenizer),
        "architecture": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "intermediate": 4 * args.hidden},
        "corpus_reviews": n_docs,
        "corpus_rows": n_rows,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "command": "python scripts/build_base_model.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "sentiment_eval": {
            "prefixes": len(prompts), "max_new_tokens": 40, "sampling": "temperature 1.0, top_k 0, top_p 1.0",
            "positive_share": round(pos_share, 3), "negative_share": round(neg_share, 3), "threshold": 0.05,
        },
        "samples": samples,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} ({size / 1e6:.1f} MB weights)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
