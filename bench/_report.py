"""bench_vs_trl.py's summary of the runs: FLOP estimates, its medians and ratios, its markdown table (the
medians, spreads and ratios themselves: _harness.py)."""

from __future__ import annotations

from _children import SYSTEMS
from _harness import fmt_summary, per_round, step_rates, summary

PAIRS = [("dpokit", "trl"), ("dpokit-precompute", "trl-precompute")]


# --------------------------------------------------------------------------------------------------------------
# FLOP estimates (see README): linear layers 2*params*positions per forward, attention 4*rows*width^2*hidden per
# layer per forward (dense, as SDPA with a mask computes it), training = 3x forward (fwd + bwd), reference = 1x.


def forward_flops(m: dict, rows: int, width: int, head_positions: int) -> float:
    layers = 2.0 * m["params_decoder_layers"] * rows * width
    attention = 4.0 * m["layers"] * rows * width * width * m["hidden"]
    head = 2.0 * m["params_lm_head"] * head_positions
    return layers + attention + head


def _flops(name: str, r: dict, m: dict, warmup: int) -> tuple[list[float], list[float]]:
    """FLOPs per measured step of dpokit run `r`: of the shapes it executed, and of TRL's padded computation."""
    shapes = r["shapes"][warmup:len(r["seconds_per_step"])]
    kind, opts = SYSTEMS[name]
    ref = 0 if opts.get("precompute_ref") else 1
    executed, useful = [], []
    for passes in shapes:  # one training step: the forward passes it ran
        flops = 0.0
        for s in passes:
            head = s["targets"] if opts["logits"] == "chunked" else s["rows"] * s["width"]
            flops += (3 + ref) * forward_flops(m, s["rows"], s["width"], head)
        executed.append(flops)
        lens = [n for s in passes for n in s["seq_lens"]]  # TRL: every sequence padded to the longest
        useful.append((3 + ref) * forward_flops(m, len(lens), max(lens), len(lens) * max(lens)))
    return executed, useful


def _round_entry(name: str, r: dict, setup: dict, warmup: int, peak: float) -> dict:
    """One run's figures: step time, throughput, memory, precompute, FLOP rates."""
    sec = r["seconds_per_step"][warmup:]
    seconds, rate = step_rates(r, warmup)
    entry = {"seconds_per_step": seconds, "tokens_per_second": rate,
             "peak_rss_mib": r["peak_rss_mib"], "train_peak_rss_mib": r.get("train_peak_rss_mib"),
             "rss_after_import_mib": r["rss_after_import_mib"],
             "peak_minus_import_mib": r["peak_rss_mib"] - r["rss_after_import_mib"],
             "precompute_seconds": r.get("precompute_seconds"),
             "precompute_tokens_per_second": (setup["data_stats"]["sequence_tokens"] / r["precompute_seconds"]
                                              if r.get("precompute_seconds") else None)}
    if r.get("shapes"):
        executed, useful = _flops(name, r, setup["model"], warmup)
        entry["executed_flops_per_second"] = sum(executed) / sum(sec)
        entry["executed_fraction_of_matmul"] = entry["executed_flops_per_second"] / peak
        entry["trl_equivalent_flops_per_second"] = sum(useful) / sum(sec)
        entry["trl_equivalent_fraction_of_matmul"] = entry["trl_equivalent_flops_per_second"] / peak
    return entry


def _pair_ratios(ra: list, rb: list) -> dict:
    """dpokit / TRL per round (TRL / dpokit for step time), each summarised with its per-round values."""
    rr = {
        "throughput (tokens/s, dpokit / TRL)": per_round(ra, rb, lambda x, y: x["tokens_per_second"] / y["tokens_per_second"]),
        "seconds/step (TRL / dpokit)": per_round(ra, rb, lambda x, y: y["seconds_per_step"] / x["seconds_per_step"]),
        "peak RSS (dpokit / TRL)": per_round(ra, rb, lambda x, y: x["peak_rss_mib"] / y["peak_rss_mib"]),
        "peak RSS above imports (dpokit / TRL)": per_round(
            ra, rb, lambda x, y: x["peak_minus_import_mib"] / y["peak_minus_import_mib"]),
    }
    if all(x["precompute_tokens_per_second"] and y["precompute_tokens_per_second"] for x, y in zip(ra, rb)):
        rr["reference precompute (tokens/s, dpokit / TRL)"] = per_round(
            ra, rb, lambda x, y: x["precompute_tokens_per_second"] / y["precompute_tokens_per_second"])
    if all(x["train_peak_rss_mib"] and y["train_peak_rss_mib"] for x, y in zip(ra, rb)):
        rr["training-phase peak RSS (dpokit / TRL)"] = per_round(
            ra, rb, lambda x, y: x["train_peak_rss_mib"] / y["train_peak_rss_mib"])
    return {k: {**summary(v), "per_round": v} for k, v in rr.items()}


def summarise(results: dict, setup: dict, args, gflops: list[float]) -> dict:
    peak = max(gflops) * 1e9
    systems = {}
    for name, runs in results.items():
        rounds = [_round_entry(name, r, setup, args.warmup, peak) for r in runs]
        agg = {key: summary([e[key] for e in rounds]) for key in rounds[0]}
        systems[name] = {"per_round": rounds, "summary": {k: v for k, v in agg.items() if v}}
    ratios = {}
    for a, b in PAIRS:
        if a in systems and b in systems:
            ratios[f"{a} vs {b}"] = _pair_ratios(systems[a]["per_round"], systems[b]["per_round"])
            # identical tokens per step in every round
            ratios[f"{a} vs {b}"]["same_batches"] = all(
                x["tokens_per_step"] == y["tokens_per_step"] for x, y in zip(results[a], results[b]))
    return {"systems": systems, "ratios": ratios}


def table(summary: dict, gflops: list[float]) -> str:
    lines = ["| system | s/step | tokens/s | peak RSS MiB | RSS above imports MiB | training-phase peak MiB | precompute s | precompute tokens/s | executed GFLOP/s (% of matmul) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["systems"].items():
        a = s["summary"]
        fl = "–"
        if "executed_flops_per_second" in a:
            fl = f"{a['executed_flops_per_second']['median'] / 1e9:.1f} ({a['executed_fraction_of_matmul']['median'] * 100:.0f}%)"
        lines.append(f"| {name} | {fmt_summary(a['seconds_per_step'], digits=3)} | {fmt_summary(a['tokens_per_second'], digits=0)} | "
                     f"{fmt_summary(a['peak_rss_mib'], digits=0)} | {fmt_summary(a['peak_minus_import_mib'], digits=0)} | "
                     f"{fmt_summary(a.get('train_peak_rss_mib'), digits=0)} | {fmt_summary(a.get('precompute_seconds'), digits=2)} | "
                     f"{fmt_summary(a.get('precompute_tokens_per_second'), digits=0)} | {fl} |")
    lines += ["", "| ratio | median (min–max over rounds) |", "|---|---|"]
    for pair, rr in summary["ratios"].items():
        for k, v in rr.items():
            if isinstance(v, dict):
                lines.append(f"| {pair}: {k} | {fmt_summary(v)} |")
        lines.append(f"| {pair}: same batches (tokens per step identical) | {rr['same_batches']} |")
    lines += ["", f"float32 matmul rate: {', '.join(f'{g:.1f}' for g in gflops)} GFLOP/s (max used as the machine rate)"]
    return "\n".join(lines)
