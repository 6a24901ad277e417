"""The paper's reward–KL frontier (§6.1, Fig. 2 left) on the demo's controlled-sentiment task.

The demo's SFT model is π_ref and its sampled, judge-labelled pairs are the preference data
(dpokit.experiments.paper.task); then every method (dpokit.experiments.paper.methods) sweeps its knob and each
resulting policy becomes a point: the mean ground-truth reward (the judge, VADER) of its samples on held-out
prompts, against KL(π‖π_ref) per sequence estimated from the same samples. :func:`run_frontier` runs the sweep and
writes frontier.json, frontier.png and report.md (dpokit.experiments.paper.frontier_report).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dpokit.config.experiments import METHODS  # noqa: F401  (re-exported)
from dpokit.errors import ConfigError
from dpokit.experiments.paper.methods import POINTS
from dpokit.experiments.paper.task import SIZES, Sizes, measure, optional_module, prepare_task

def frontier_contents(output: Path) -> list[str]:
    """What of an earlier sweep `output` holds: everything but dpokit's lock file (a sweep fills its directory)."""
    from dpokit.train.rundir import LOCK

    return sorted(p.name for p in output.iterdir() if p.name != LOCK) if output.is_dir() else []


def run_frontier(output: str, sizes: str | Sizes = "full", *, methods: tuple[str, ...] = METHODS, seed: int = 0,
                 threads: int | None = None, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the sweep; write OUTPUT/frontier.json, frontier.png and report.md; return the frontier dict.

    OUTPUT is held like a training run's (dpokit.train.rundir): a directory in use by another sweep is refused, and one
    that holds anything is refused unless `overwrite` clears it first."""
    from dpokit.train.rundir import claim_output

    with claim_output(output, resume=False, overwrite=overwrite, contents=frontier_contents, resumable=False):
        return _run_frontier(output, sizes, methods=methods, seed=seed, threads=threads, log=log)


def _run_frontier(output: str, sizes: str | Sizes, *, methods: tuple[str, ...], seed: int, threads: int | None,
                  log: Callable[[str], None]) -> dict:
    from dpokit.experiments.paper.frontier_report import machine, write_outputs

    if isinstance(sizes, str):
        if sizes not in SIZES:
            raise ConfigError(f"--sizes must be one of {', '.join(SIZES)}; got {sizes!r}")
        sizes_name, sizes = sizes, SIZES[sizes]
    else:
        sizes_name = "custom"
    unknown = [m for m in methods if m not in POINTS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stages = len(methods) + 1

    def say(line: str) -> None:
        log(f"[{time.monotonic() - started:6.0f} s] {line}")

    say(f"[1/{stages}] π_ref (the demo's SFT) and its preference pairs")
    task = prepare_task(out, sizes, seed, threads, say)
    reference = measure(task, task.reference, "sft", {})
    points, skipped, seconds = [], {}, {}
    for k, method in enumerate(methods, start=2):
        function, needs = POINTS[method]
        missing = [m for m in needs if optional_module(m) is None]
        if missing:
            skipped[method] = "dpokit.experiments.paper." + ", dpokit.experiments.paper.".join(missing) + " not available"
            say(f"[{k}/{stages}] {method}: skipped ({skipped[method]})")
            continue
        say(f"[{k}/{stages}] {method}")
        begun = time.monotonic()
        points += function(task)
        seconds[method] = time.monotonic() - begun
    frontier = {"points": points, "reference": reference, "skipped": skipped, "judge": task.sizes.demo.judge,
                "sizes": sizes_name,
                "config": json.loads(json.dumps(asdict(task.sizes))), "seed": seed,
                "seconds": {**seconds, "total": time.monotonic() - started}, "machine": machine()}
    write_outputs(out, frontier)
    say(f"done: {out / 'frontier.json'}, {out / 'frontier.png'}, {out / 'report.md'}")
    return frontier
