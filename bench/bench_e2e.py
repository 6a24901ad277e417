#!/usr/bin/env python
"""End to end: `dpokit dpo` and a TRL DPOTrainer script as whole processes, timed as a user's stopwatch times them.

    python bench/bench_e2e.py                    # 3 shapes x 3 modes, steps 2 and 10, 3 interleaved rounds
    python bench/bench_e2e.py --quick            # tiny model, 1 round, steps 1 and 3: checks that it works

Every run is one whole process: ``python -m dpokit.cli dpo ...`` (the command line, which re-executes itself on the
malloc it ships with) or ``python bench/_e2e_trl.py ...`` (DPOTrainer as a user's script: float32, no gradient
checkpointing, AdamW, same model, data, batches, learning rate, beta, gradient clipping and thread count). Each
runs under a small parent of its own that times it from start to exit and reads its peak RSS (ru_maxrss of its
children: bench/_setup.py, ``whole_process``). Both start from the same saved random Llama and read the same
pairs (TRL's copy in the order dpokit's first epoch visits them, with a sequential sampler), from scratch: dpokit
with ``--no-data-cache``, TRL from an in-memory data set, so both tokenise in every run.

Each system runs for N and for M optimizer steps on the same data (batch x M pairs, so the tokenising, the
reference precompute and the final save are the same work in both); the end-to-end time of a step is
(t_M - t_N) / (M - N): everything the process does once cancels, everything it does per step counts. Beside it:
dpokit's in-process step (the ``seconds_per_step`` of its metrics.jsonl, median over steps N+1..M of the M run) and
TRL's (between consecutive ``on_step_end`` callbacks, as bench_vs_trl.py times it, the same steps), the gap between
each in-process step and the end-to-end one, the whole M-step process time, and the peak RSS of the M-step process.

Shapes (mean tokens, each length uniform in mean x (1 ± --spread)): ``chat`` prompt 64 / responses 64 (max
length 256), ``current`` ~200 / ~120 (bench_vs_trl.py's, max length 512), ``long`` 1,024 / 256 (max length
2,048). Modes: ``full`` (full fine-tuning, reference model resident), ``precompute`` (reference log-probs computed
before training: dpokit ``--precompute-ref``, TRL ``precompute_ref_log_probs=True``), ``lora`` (LoRA r 16, alpha
32, no dropout, every linear layer: dpokit ``--lora-r 16``, TRL with a peft ``LoraConfig``).

``--dtypes float32,bfloat16`` runs both systems in each precision (default float32 only): ``dpokit-bf16`` is
``dpokit dpo --dtype bfloat16`` (bfloat16 autocast over float32 master weights in full fine-tuning, the reference
model held in bfloat16; a LoRA base stored in bfloat16), ``trl-bf16`` the TRL script with ``bf16=True`` (autocast
over its float32 model and reference), everything else as in the float32 runs. Per precision, dpokit against TRL;
where both ran, a second table of each system's bfloat16 speed-up and of TRL bfloat16 against dpokit float32.
``--trl-defaults`` runs the TRL script with TRL's own defaults for bf16, gradient checkpointing and the optimizer
(TRL as it ships, not like for like; bf16 autocast whatever --dtypes says).

Rounds are interleaved: within a round, for each mode, dpokit N, TRL N, dpokit M, TRL M (reversed every other
round; with two precisions, all four systems at N, then at M); values are medians over rounds (min-max), ratios
are per round. Run it on an idle machine (bench/README.md, "End to end"); a busy one makes every figure
meaningless.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from _harness import (alternating, apply_quick, harness_parser, interleave, markdown, median, round_tag, spread,
                      summary, tree_state, write_result)
from _setup import add_model_options, allocators, build_inputs, quiet_environment, whole_process, workdir

HERE = Path(__file__).resolve().parent
TRL_SCRIPT = HERE / "_e2e_trl.py"
SYSTEMS = ("dpokit", "trl")
# --dtypes: dtype -> the suffix of the system names that run in it ("dpokit-bf16", "trl-bf16")
DTYPES = {"float32": "", "bfloat16": "-bf16"}
# system name -> (program, dtype)
PROGRAMS = {program + suffix: (program, dtype) for dtype, suffix in DTYPES.items() for program in SYSTEMS}
# name -> (mean prompt tokens, mean response tokens incl. EOS, max length)
SHAPES = {"chat": (64, 64, 256), "current": (200, 120, 512), "long": (1024, 256, 2048)}
LORA = ["--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0"]
# name -> options both commands take (bench/_e2e_trl.py names its options as dpokit's)
MODES = {"full": [], "precompute": ["--precompute-ref"], "lora": LORA}
# --quick's batch and model
TINY = dict(batch_size=2, hidden=64, layers=2, heads=2, vocab=1024)
# dpokit's own settings made to match the TRL script's: AdamW, constant lr without warm-up, beta 0.1, no
# checkpoint by the clock, tokenised afresh (TRL tokenises every run); the final save is on in both
DPOKIT_SETTINGS = ["--optimizer", "adamw", "--schedule", "constant", "--warmup-steps", "0", "--beta", "0.1",
                   "--weight-decay", "0", "--save-every", "0", "--save-every-minutes", "0", "--log-every", "1",
                   "--no-data-cache"]


def parse_args():
    parser = harness_parser(__doc__, rounds=3, batch_size=8, threads=2, child=None,
                            threads_help="torch threads of both commands (dpokit --threads, the TRL script's "
                                         "torch.set_num_threads, OMP_NUM_THREADS of both) (default 2)",
                            quick="tiny check that it works: 1 round, steps 1,3, batch 2, hidden 64, 2 layers, "
                                  "vocabulary 1024")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--steps", default="2,10", help="N,M: the two step counts each system runs (default 2,10)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated subset of float32, bfloat16: both systems run in each (dpokit "
                             "--dtype, the TRL script's bf16) (default float32)")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="the TRL script with TRL's own defaults for bf16 (autocast, on CPU too), gradient "
                             "checkpointing (on) and the optimizer (fused AdamW) instead of dpokit's settings")
    add_fixture_options(parser)
    args = parser.parse_args()
    apply_quick(args, rounds=1, steps="1,3", **TINY)
    for option, known in (("shapes", SHAPES), ("modes", MODES), ("dtypes", DTYPES)):
        chosen = [s.strip() for s in getattr(args, option).split(",") if s.strip()]
        if not chosen or any(s not in known for s in chosen):
            parser.error(f"--{option}: choose from {', '.join(known)}")
        setattr(args, option, chosen)
    args.systems = [program + DTYPES[dtype] for dtype in args.dtypes for program in SYSTEMS]
    try:
        args.n_steps, args.m_steps = (int(s) for s in args.steps.split(","))
    except ValueError:
        parser.error("--steps takes two counts, N,M")
    if not 0 < args.n_steps < args.m_steps:
        parser.error("--steps N,M needs 0 < N < M")
    return args


def add_fixture_options(parser) -> None:
    """--spread, --vocab and the random Llama's shape: the fixture's options (bench_bf16_loss.py's too)."""
    parser.add_argument("--spread", type=float, default=0.3, help="lengths uniform in mean x (1 ± spread)")
    parser.add_argument("--vocab", type=int, default=8192)
    add_model_options(parser)


def command(system: str, mode: str, steps: int, setup: dict, args, output: Path, step_log: Path) -> list[str]:
    """The command line of one run of `system` (a name of PROGRAMS)."""
    program, dtype = PROGRAMS[system]
    common = ["--model", setup["model_dir"], "--output", str(output), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--max-steps", str(steps), "--lr", str(args.lr),
              "--threads", str(args.threads), "--seed", str(args.seed), "--max-grad-norm", "1.0", "--dtype", dtype,
              *MODES[mode]]
    if program == "dpokit":
        return [sys.executable, "-m", "dpokit.cli", "dpo", *common, "--data", setup["data"],
                "--max-prompt-length", str(setup["max_prompt_length"]), *DPOKIT_SETTINGS]
    return [sys.executable, str(TRL_SCRIPT), *common, "--data", setup["data_trl"], "--step-log", str(step_log),
            *(["--trl-defaults"] if args.trl_defaults else [])]


def dpokit_process(system: str, mode: str, steps: int, setup: dict, args, output: Path, env: dict, log: Path,
                   what: str) -> tuple[dict, list[dict]]:
    """One whole `dpokit dpo` process of `system` (a dpokit name of PROGRAMS) writing to `output`, which is cleared
    before and removed after: its measurement (whole_process) and the train rows of its metrics.jsonl. A failed
    run ends the script, naming `what` and showing the end of its log."""
    from dpokit.train.metrics import read_metrics

    shutil.rmtree(output, ignore_errors=True)
    measured = whole_process(command(system, mode, steps, setup, args, output, step_log=None), env, log=log)
    if measured["returncode"] != 0:
        raise SystemExit(f"{what} failed (exit {measured['returncode']}):\n{measured['output'][-3000:]}")
    rows = [r for r in read_metrics(output / "metrics.jsonl") if r["split"] == "train"]
    shutil.rmtree(output, ignore_errors=True)
    return measured, rows

def runner(setup: dict, args, work: Path):
    """run(name, round_) for the names "mode/system/steps": one whole process, measured; the per-step seconds it
    logged in-process (dpokit's metrics.jsonl, the TRL script's step log)."""
    env = quiet_environment(threads=args.threads, HF_DATASETS_CACHE=str(work / "hf_datasets_cache"))

    def run(name: str, round_: int) -> dict:
        mode, system, steps = name.split("/")
        tag = f"{mode}_{system}_{steps}_{round_}"
        output, step_log = work / f"run_{tag}", work / f"steps_{tag}.json"
        shutil.rmtree(output, ignore_errors=True)
        step_log.unlink(missing_ok=True)
        measured = whole_process(command(system, mode, int(steps), setup, args, output, step_log), env,
                                 log=work / f"log_{tag}.txt")
        tail = measured.pop("output")[-3000:]
        if measured["returncode"] != 0:
            shutil.rmtree(output, ignore_errors=True)
            return {**measured, "failed": True, "log_tail": tail}
        if PROGRAMS[system][0] == "dpokit":
            from dpokit.train.metrics import read_metrics

            rows = [r for r in read_metrics(output / "metrics.jsonl") if r["split"] == "train"]
            in_process = [r["seconds_per_step"] for r in rows]
        else:
            in_process = json.loads(step_log.read_text())["seconds_per_step"]
        shutil.rmtree(output, ignore_errors=True)
        return {**measured, "in_process_seconds_per_step": in_process}

    return run


def report_line(args):
    def line(name: str, round_: int, r: dict) -> None:
        what = f"{round_tag(round_, args.rounds)} {name:22s}"
        if r.get("failed"):
            print(f"{what} FAILED (exit {r['returncode']}); log tail:\n{r['log_tail']}", flush=True)
        else:
            print(f"{what} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)

    return line


KEYS = ("e2e_seconds_per_step", "in_process_seconds_per_step", "gap_seconds", "whole_process_seconds",
        "peak_rss_mib")


def summarise(results: dict, mode: str, dtype: str, args) -> dict:
    """Per system (dpokit, TRL: their runs in `dtype`) and round: the end-to-end and in-process seconds per step,
    their gap, the M-step process's seconds and peak RSS (None for a round where a run failed); per key, the values
    of the rounds that ran and their :func:`summary`; the same for the per-round dpokit / TRL ratios."""
    n, m = args.n_steps, args.m_steps
    per_system, rounds = {}, {}
    for system in SYSTEMS:
        name = f"{mode}/{system}{DTYPES[dtype]}"
        runs_n, runs_m = results[f"{name}/{n}"], results[f"{name}/{m}"]
        rounds[system] = [None if a.get("failed") or b.get("failed") else {
            "e2e_seconds_per_step": (b["seconds"] - a["seconds"]) / (m - n),
            "in_process_seconds_per_step": median(b["in_process_seconds_per_step"][n:]),
            "whole_process_seconds": b["seconds"], "peak_rss_mib": b["peak_rss_mib"],
            "n_steps_process_seconds": a["seconds"],
        } for a, b in zip(runs_n, runs_m)]
        for r in rounds[system]:
            if r:
                r["gap_seconds"] = r["e2e_seconds_per_step"] - r["in_process_seconds_per_step"]
        ok = [r for r in rounds[system] if r]
        per_system[system] = {"per_round": rounds[system], "failed_rounds": len(rounds[system]) - len(ok),
                              **{key: _values([r[key] for r in ok]) for key in KEYS}}
    both = [(a, b) for a, b in zip(rounds["dpokit"], rounds["trl"]) if a and b]  # rounds where all four ran
    ratios = {  # throughput: TRL's seconds / dpokit's; memory: dpokit's peak / TRL's
        "e2e_throughput": lambda a, b: b["e2e_seconds_per_step"] / a["e2e_seconds_per_step"],
        "in_process_throughput": lambda a, b: b["in_process_seconds_per_step"] / a["in_process_seconds_per_step"],
        "whole_process_time": lambda a, b: b["whole_process_seconds"] / a["whole_process_seconds"],
        "peak_rss": lambda a, b: a["peak_rss_mib"] / b["peak_rss_mib"],
    }
    return {"systems": per_system, "ratios": {name: _values([value(a, b) for a, b in both])
                                              for name, value in ratios.items()}}


def _values(xs: list) -> dict:
    return {"values": xs, "summary": summary(xs)}


def bf16_ratios(summaries: dict) -> dict:
    """Per shape and mode where both precisions ran, per round, ratios of end-to-end seconds per step: each
    system's float32 / bfloat16 (bfloat16's speed-up) and TRL bfloat16 / dpokit float32."""
    def e2e(systems: dict, system: str) -> list:
        return [r and r["e2e_seconds_per_step"] for r in systems[system]["per_round"]]

    def ratio(top: list, bottom: list) -> dict:
        return _values([a / b for a, b in zip(top, bottom) if a and b])

    out = {}
    for shape, mode, dtype in summaries:
        if dtype == "bfloat16" and (shape, mode, "float32") in summaries:
            f32, bf16 = (summaries[(shape, mode, d)]["systems"] for d in ("float32", "bfloat16"))
            out[f"{shape}/{mode}"] = {
                "dpokit_f32_over_bf16": ratio(e2e(f32, "dpokit"), e2e(bf16, "dpokit")),
                "trl_f32_over_bf16": ratio(e2e(f32, "trl"), e2e(bf16, "trl")),
                "trl_bf16_over_dpokit_f32": ratio(e2e(bf16, "trl"), e2e(f32, "dpokit"))}
    return out


def table(summaries: dict, args) -> str:
    """One row per shape, mode and precision: median (min–max over rounds)."""
    header = ["shape", "mode", "dtype", "dpokit s/step e2e", "in-process", "gap", "TRL s/step e2e", "in-process",
              "gap", "TRL / dpokit s/step e2e", "in-process", f"whole {args.m_steps}-step process s, dpokit / TRL",
              "TRL / dpokit", "peak RSS MiB, dpokit / TRL", "memory ratio"]
    rows = []
    for (shape, mode, dtype), s in summaries.items():
        d, t, r = s["systems"]["dpokit"], s["systems"]["trl"], s["ratios"]
        sec = [spread(x[key]["values"]) for x in (d, t) for key in KEYS[:3]]
        rows.append([shape, mode, dtype, *sec, spread(r["e2e_throughput"]["values"], "{:.2f}"),
                     spread(r["in_process_throughput"]["values"], "{:.2f}"),
                     f"{spread(d['whole_process_seconds']['values'], '{:.1f}')} / "
                     f"{spread(t['whole_process_seconds']['values'], '{:.1f}')}",
                     spread(r["whole_process_time"]["values"], "{:.2f}"),
                     f"{spread(d['peak_rss_mib']['values'], '{:.0f}')} / "
                     f"{spread(t['peak_rss_mib']['values'], '{:.0f}')}",
                     spread(r["peak_rss"]["values"], "{:.2f}")])
    return markdown(header, rows)


def bf16_table(ratios: dict) -> str:
    """One row per shape and mode of :func:`bf16_ratios`: median (min–max over rounds)."""
    header = ["shape / mode", "dpokit float32 / bfloat16 s/step e2e", "TRL float32 / bfloat16",
              "TRL bfloat16 / dpokit float32"]
    return markdown(header, [[key, *(spread(r["values"], "{:.2f}") for r in row.values())]
                             for key, row in ratios.items()])


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    tree = {"before": tree_state()}
    names = [f"{mode}/{system}/{steps}" for mode in args.modes for steps in (args.n_steps, args.m_steps)
             for system in args.systems]
    setups, raw, summaries = {}, {}, {}
    with workdir(args, "dpokit_e2e_") as work:
        for shape in args.shapes:
            prompt_len, response_len, max_length = SHAPES[shape]
            shape_args = argparse.Namespace(**{**vars(args), "prompt_len": prompt_len, "response_len": response_len,
                                               "max_length": max_length, "pairs": args.batch_size * args.m_steps})
            print(f"\n== shape {shape}: prompts ~{prompt_len} tokens, responses ~{response_len}, max length "
                  f"{max_length}", flush=True)
            (work / shape).mkdir(exist_ok=True)
            setups[shape] = build_inputs(shape_args, work / shape)
            run = runner(setups[shape], shape_args, work / shape)
            if shape == args.shapes[0]:  # the first process of each program reads its files from disk: not timed
                for system in args.systems[:len(SYSTEMS)]:
                    report_line(args)(f"{args.modes[0]}/{system}/{args.n_steps}", -1,
                                      run(f"{args.modes[0]}/{system}/{args.n_steps}", -1))
            raw[shape] = interleave(args.rounds, alternating(names), run, report_line(args))
            for mode in args.modes:
                for dtype in args.dtypes:
                    summaries[(shape, mode, dtype)] = summarise(raw[shape], mode, dtype, args)
    tree["after"] = tree_state()
    text, ratios = table(summaries, args), bf16_ratios(summaries)
    model = next(iter(setups.values()))["model"]
    trl = ("TRL with its defaults for bf16, checkpointing, optimizer" if args.trl_defaults
           else "TRL in the same precision")
    print(f"\nend to end, dpokit dpo vs a TRL DPOTrainer script ({trl}): batch {args.batch_size} pairs, "
          f"{args.threads} threads, steps {args.n_steps} and {args.m_steps} (s/step = (t_M - t_N) / (M - N)), "
          f"{args.rounds} round(s); model {model['params_total'] / 1e6:.2f}M params (hidden {model['hidden']}, "
          f"{model['layers']} layers, vocab {model['vocab']}); values: median (min–max over rounds); ratios per "
          "round: throughput = TRL s/step / dpokit's, memory = dpokit peak / TRL's; gap = e2e − in-process s/step")
    print(text)
    if ratios:
        print("\nbfloat16 against float32, end-to-end s/step per round:")
        print(bf16_table(ratios))
    if tree["before"] != tree["after"]:
        print("\nWARNING: src/ changed while the benchmark ran: different runs may have measured different code")
    failed = {name: k for shape in raw for name, runs in raw[shape].items()
              if (k := sum(1 for r in runs if r.get("failed")))}
    if failed:
        print("\nfailed runs: " + ", ".join(f"{n} x{k}" for n, k in failed.items()) + " (log tails in the JSON)")
    payload = {"setup": setups, "summary": {"/".join(key): s for key, s in summaries.items()},
               "bf16_ratios": ratios, "raw": raw, "dpokit_tree": tree, "table_markdown": text,
               "bf16_table_markdown": bf16_table(ratios) if ratios else None}
    path = write_result(args, "e2e-", payload, t0,
                        {"allocators": allocators(args.systems, "as-shipped"), "threads": args.threads})
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
