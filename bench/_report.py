"""Summarising the runs: FLOP estimates, the machine's matmul rate, medians and ratios, the markdown table."""

from __future__ import annotations

import math
import statistics
import time

from _children import SYSTEMS

PAIRS = [("dpokit", "trl"), ("dpokit-precompute", "trl-precompute")]


# --------------------------------------------------------------------------------------------------------------
# FLOP estimates (see README): linear layers 2*params*positions per forward, attention 4*rows*width^2*hidden per
# layer per forward (dense, as SDPA with a mask computes it), training = 3x forward (fwd + bwd), reference = 1x.


def forward_flops(m: dict, rows: int, width: int, head_positions: int) -> float:
    layers = 2.0 * m["params_decoder_layers"] * rows * width
    attention = 4.0 * m["layers"] * rows * width * width * m["hidden"]
    head = 2.0 * m["params_lm_head"] * head_positions
    return layers + attention + head


# --------------------------------------------------------------------------------------------------------------
# the machine's float32 matmul rate (the denominator of the FLOP fractions)


def matmul_gflops(threads: int, size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 [size x size] @ [size x 4 size] rate in GFLOP/s with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, 4 * size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2.0 * size * size * 4 * size / best / 1e9


# --------------------------------------------------------------------------------------------------------------
# summary


def on_off(step, batches: list) -> tuple[list[float], list[float], list[tuple]]:
    """An A/B of one change within one run. `step(flag, batch)` runs a batch with the change on (True) or off and
    returns (seconds, result); both run on every batch, the order flipped every batch, after one call of each on the
    first batch (first-call allocations). Returns the seconds on, the seconds off and each batch's (result on,
    result off)."""
    step(True, batches[0]), step(False, batches[0])
    on, off, results = [], [], []
    for i, batch in enumerate(batches):
        order = (True, False) if i % 2 else (False, True)
        ran = {flag: step(flag, batch) for flag in order}
        on.append(ran[True][0])
        off.append(ran[False][0])
        results.append((ran[True][1], ran[False][1]))
    return on, off, results


def speedup(on: list[float], off: list[float]) -> str:
    """The per-batch speed-ups of an :func:`on_off` run: median (min-max)."""
    ratios = [b / a for a, b in zip(on, off)]
    return f"x{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _spread(xs, fmt="{:.3f}"):
    """The median and the range of `xs`: "median (min–max)"; "–" when there are none."""
    if not xs:
        return "–"
    return f"{fmt.format(_med(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def summarise(results: dict, setup: dict, args, gflops: list[float]) -> dict:
    m = setup["model"]
    peak = max(gflops) * 1e9
    systems = {}
    for name, runs in results.items():
        per_round = []
        for r in runs:
            w = args.warmup
            sec = r["seconds_per_step"][w:]
            tok = r["tokens_per_step"][w:]
            entry = {"seconds_per_step": _med(sec), "tokens_per_second": sum(tok) / sum(sec),
                     "peak_rss_mib": r["peak_rss_mib"], "train_peak_rss_mib": r.get("train_peak_rss_mib"),
                     "rss_after_import_mib": r["rss_after_import_mib"],
                     "peak_minus_import_mib": r["peak_rss_mib"] - r["rss_after_import_mib"],
                     "precompute_seconds": r.get("precompute_seconds"),
                     "precompute_tokens_per_second": (setup["data_stats"]["sequence_tokens"] / r["precompute_seconds"]
                                                      if r.get("precompute_seconds") else None)}
            if r.get("shapes"):
                shapes = r["shapes"][w:len(r["seconds_per_step"])]
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
                entry["executed_flops_per_second"] = sum(executed) / sum(sec)
                entry["executed_fraction_of_matmul"] = entry["executed_flops_per_second"] / peak
                entry["trl_equivalent_flops_per_second"] = sum(useful) / sum(sec)
                entry["trl_equivalent_fraction_of_matmul"] = entry["trl_equivalent_flops_per_second"] / peak
            per_round.append(entry)
        agg = {}
        for key in per_round[0]:
            vals = [e[key] for e in per_round if e[key] is not None]
            if vals:
                agg[key] = {"median": _med(vals), "min": min(vals), "max": max(vals)}
        systems[name] = {"per_round": per_round, "summary": agg}
    ratios = {}
    for a, b in PAIRS:
        if a in systems and b in systems:
            ra, rb = systems[a]["per_round"], systems[b]["per_round"]
            rr = {
                "throughput (tokens/s, dpokit / TRL)": [x["tokens_per_second"] / y["tokens_per_second"] for x, y in zip(ra, rb)],
                "seconds/step (TRL / dpokit)": [y["seconds_per_step"] / x["seconds_per_step"] for x, y in zip(ra, rb)],
                "peak RSS (dpokit / TRL)": [x["peak_rss_mib"] / y["peak_rss_mib"] for x, y in zip(ra, rb)],
                "peak RSS above imports (dpokit / TRL)": [x["peak_minus_import_mib"] / y["peak_minus_import_mib"] for x, y in zip(ra, rb)],
            }
            if all(x["precompute_tokens_per_second"] and y["precompute_tokens_per_second"] for x, y in zip(ra, rb)):
                rr["reference precompute (tokens/s, dpokit / TRL)"] = [
                    x["precompute_tokens_per_second"] / y["precompute_tokens_per_second"] for x, y in zip(ra, rb)]
            same = all(x["tokens_per_step"] == y["tokens_per_step"] for x, y in zip(results[a], results[b]))
            if all(x["train_peak_rss_mib"] and y["train_peak_rss_mib"] for x, y in zip(ra, rb)):
                rr["training-phase peak RSS (dpokit / TRL)"] = [x["train_peak_rss_mib"] / y["train_peak_rss_mib"] for x, y in zip(ra, rb)]
            ratios[f"{a} vs {b}"] = {k: {"median": _med(v), "min": min(v), "max": max(v), "per_round": v} for k, v in rr.items()}
            ratios[f"{a} vs {b}"]["same_batches"] = same  # identical tokens per step in every round
    return {"systems": systems, "ratios": ratios}


def _fmt(agg: dict | None, scale=1.0, digits=2) -> str:
    if not agg:
        return "–"
    return f"{agg['median'] * scale:.{digits}f} ({agg['min'] * scale:.{digits}f}–{agg['max'] * scale:.{digits}f})"


def table(summary: dict, gflops: list[float]) -> str:
    lines = ["| system | s/step | tokens/s | peak RSS MiB | RSS above imports MiB | training-phase peak MiB | precompute s | precompute tokens/s | executed GFLOP/s (% of matmul) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["systems"].items():
        a = s["summary"]
        fl = "–"
        if "executed_flops_per_second" in a:
            fl = f"{a['executed_flops_per_second']['median'] / 1e9:.1f} ({a['executed_fraction_of_matmul']['median'] * 100:.0f}%)"
        lines.append(f"| {name} | {_fmt(a['seconds_per_step'], digits=3)} | {_fmt(a['tokens_per_second'], digits=0)} | "
                     f"{_fmt(a['peak_rss_mib'], digits=0)} | {_fmt(a['peak_minus_import_mib'], digits=0)} | "
                     f"{_fmt(a.get('train_peak_rss_mib'), digits=0)} | {_fmt(a.get('precompute_seconds'), digits=2)} | "
                     f"{_fmt(a.get('precompute_tokens_per_second'), digits=0)} | {fl} |")
    lines += ["", "| ratio | median (min–max over rounds) |", "|---|---|"]
    for pair, rr in summary["ratios"].items():
        for k, v in rr.items():
            if isinstance(v, dict):
                lines.append(f"| {pair}: {k} | {_fmt(v)} |")
        lines.append(f"| {pair}: same batches (tokens per step identical) | {rr['same_batches']} |")
    lines += ["", f"float32 matmul rate: {', '.join(f'{g:.1f}' for g in gflops)} GFLOP/s (max used as the machine rate)"]
    return "\n".join(lines)
