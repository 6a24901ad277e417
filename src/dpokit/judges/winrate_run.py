"""`dpokit winrate` end to end: sample one response per prompt from a model and a baseline at each temperature
(dpokit's one sampler, chat templates honoured; the model with the seed, the baseline with the seed + 1, so that
the two samples are independent), judge them pairwise (:mod:`dpokit.judges.winrate`), write the
per-prompt records and, over several temperatures, a plot of win rate against temperature (the DPO paper's
Fig. 2 right and Fig. 3 left)."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from dpokit.errors import ConfigError, DpokitError
from dpokit.eval.generation import render_prompts, sample
from dpokit.judges.pairwise import PairwiseJudge
from dpokit.data.prompts import Prompt
from dpokit.data.records import tools_of
from dpokit.judges.winrate import Judged, compare, summarise


def check_same_tokenizer(model: PreTrainedTokenizerBase, baseline: PreTrainedTokenizerBase) -> None:
    """Refuse a baseline whose tokenizer differs from the model's (vocabulary, special tokens, chat template):
    the two would not read the same prompts."""
    vocab_a, vocab_b = model.get_vocab(), baseline.get_vocab()
    if vocab_a != vocab_b:
        differ = len(set(vocab_a.items()) ^ set(vocab_b.items()))
        raise ConfigError(f"--model and --baseline have different tokenizers: vocabularies of {len(vocab_a)} and "
                          f"{len(vocab_b)} tokens ({differ} entries differ); compare models that share a tokenizer")
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        a, b = getattr(model, name, None), getattr(baseline, name, None)
        if a != b:
            raise ConfigError(f"--model and --baseline have different tokenizers: {name} {a!r} vs {b!r}")
    if sorted(model.all_special_tokens) != sorted(baseline.all_special_tokens):
        raise ConfigError("--model and --baseline have different tokenizers: special tokens "
                          f"{sorted(model.all_special_tokens)} vs {sorted(baseline.all_special_tokens)}")
    if getattr(model, "chat_template", None) != getattr(baseline, "chat_template", None):
        raise ConfigError("--model and --baseline have different chat templates: their prompts would differ")


def check_inputs(model: str, baseline: str, prompts: Sequence[Prompt], *, chat_template: bool | None = None,
                 system: str | None = None) -> None:
    """What can be refused before any model is loaded: a baseline with another tokenizer, prompts that cannot be
    rendered (message lists without a chat template, say)."""
    from dpokit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    check_same_tokenizer(tokenizer, load_tokenizer(baseline))
    render_prompts(tokenizer, prompts, chat_template=chat_template, system=system)


def sample_responses(path: str, prompts: Sequence[Prompt], temperatures: Sequence[float], *, device: str,
                     **options) -> dict[float, list[str]]:
    """One response per prompt from the model at `path` at each temperature (options: those of
    :func:`dpokit.eval.generation.sample`; the same seed at every temperature)."""
    from dpokit.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_model(path).to(device)
    try:
        return {t: [group[0] for group in sample(model, tokenizer, prompts, temperature=t, num_samples=1, **options)]
                for t in temperatures}
    finally:
        del model
        gc.collect()


def write_records(path: Path, prompts: Sequence[Prompt], names: Sequence[str], temperature: float,
                  model_responses: Sequence[str], baseline_responses: Sequence[str], judged: Sequence[Judged],
                  append: bool) -> None:
    """One JSON line per prompt: the prompt (and the tools it offers, if any), both responses, the order shown,
    the judge's preference for the first response and the model's outcome ("win", "loss", "tie", or "skipped"
    with the judge's error)."""
    words = {1.0: "win", 0.0: "loss", 0.5: "tie", None: "skipped"}
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for i, j in enumerate(judged):
            tools = tools_of(prompts[i])  # a ToolPrompt is written as its messages: its tools go beside them
            row = {"temperature": temperature, "prompt_index": i, "where": names[i], "prompt": prompts[i],
                   **({"tools": tools} if tools else {}), "model_response": model_responses[i],
                   "baseline_response": baseline_responses[i],
                   "shown_first": "model" if j.model_first else "baseline",
                   "first_preferred": None if j.error else j.preference, "outcome": words[j.outcome]}
            if j.error:
                row["error"] = j.error
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_win_rates(results: Sequence[dict], path: Path, title: str) -> Path:
    """Win rate against sampling temperature, with the bootstrap interval as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["temperature"] for r in results]
    ys = [r["win_rate"] for r in results]
    errors = [[y - r["ci_low"] for y, r in zip(ys, results)], [r["ci_high"] - y for y, r in zip(ys, results)]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=4)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate ({results[0]['confidence']:.0%} CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_winrate(model: str, baseline: str, prompts: Sequence[Prompt], judge: PairwiseJudge, judge_name: str, *,
                temperatures: Sequence[float], names: Sequence[str] | None = None, output: str | None = None,
                on_judge_error: str = "stop", seed: int = 0, resamples: int = 2000, confidence: float = 0.95,
                max_new_tokens: int = 64, top_p: float = 1.0, batch_size: int = 16,
                chat_template: bool | None = None, system: str | None = None, plot: bool | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
    """The win rate of `model` against `baseline` at each temperature, as judged by `judge`: one dict per
    temperature (see :func:`dpokit.judges.winrate.summarise`). With `output`, writes winrate.jsonl there and, with `plot`
    (default: over more than one temperature), winrate.png. `names` says where each prompt came from (for error messages)."""
    names = list(names) if names is not None else [f"prompt {i + 1}" for i in range(len(prompts))]
    check_inputs(model, baseline, prompts, chat_template=chat_template, system=system)
    out = Path(output) if output else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size, chat_template=chat_template,
                   system=system)
    responses = {}
    # the baseline gets the next seed: with one seed the two samples would be coupled (the same random draws),
    # and two similar models would give the same response far more often than independent samples do
    for role, path, role_seed in (("model", model, seed), ("baseline", baseline, seed + 1)):
        log(f"sampling {len(prompts)} responses from the {role} {path} at temperature "
            f"{', '.join(map(str, temperatures))}")
        responses[role] = sample_responses(path, prompts, temperatures, device=device, seed=role_seed, **options)
    results = []
    for k, t in enumerate(temperatures):
        log(f"judging {len(prompts)} pairs at temperature {t} with {judge_name}")
        mine, theirs = responses["model"][t], responses["baseline"][t]
        judged = compare(judge, prompts, mine, theirs, seed=seed)
        if out is not None:
            write_records(out / "winrate.jsonl", prompts, names, t, mine, theirs, judged, append=k > 0)
        failed = [(names[i], j.error) for i, j in enumerate(judged) if j.error]
        if failed and on_judge_error != "skip":
            shown = "; ".join(f"{where}: {error}" for where, error in failed[:5])
            more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
            raise DpokitError(f"the judge failed on {len(failed)} of {len(prompts)} prompts at temperature {t}: "
                              f"{shown}{more}; --on-judge-error skip leaves them out")
        if failed:
            log(f"skipped {len(failed)} prompts the judge failed on: {', '.join(w for w, _ in failed[:10])}")
        results.append({**summarise(judged, resamples=resamples, confidence=confidence, seed=seed),
                        "temperature": t, "judge": judge_name, "model": model, "baseline": baseline, "seed": seed})
    if out is not None and (len(results) > 1 if plot is None else plot):
        path = plot_win_rates(results, out / "winrate.png", f"{model}\nvs {baseline}; judge {judge_name}")
        log(f"wrote {path}")
    return results
