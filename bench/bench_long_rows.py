"""Peak memory of `dpokit eval` (and `dpokit dpo`, one step) on a data file with one huge row: a JSONL line whose
prompt is `--megabytes` MB of words, among ordinary rows. The row is cut before tokenising (--on-long-rows cut,
the default), so memory stays bounded by the line itself, not by what the tokenizer would build for it.

    python bench/bench_long_rows.py --megabytes 100

Prints the peak RSS of each whole process (the user's stopwatch and `top`), and what the filtering report said.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import build_tokenizer, quiet_environment, random_llama, whole_process  # noqa: E402

WORDS = "the a film movie plot actor great good bad awful boring wonderful dull fun slow fast".split()


def write_data(path: Path, megabytes: int, seed: int = 0) -> None:
    """Ordinary pairs around one row whose prompt is `megabytes` MB of words (written in pieces)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(8):
            row = {"prompt": " ".join(rng.choices(WORDS, k=12)), "chosen": " good", "rejected": " bad"}
            out.write(json.dumps(row) + "\n")
            if i == 3:
                out.write('{"chosen": " fine", "rejected": " dull", "prompt": "')
                piece = " ".join(rng.choices(WORDS, k=200_000)) + " "
                for _ in range(max(1, megabytes * 2**20 // len(piece))):
                    out.write(piece)
                out.write('"}\n')


def peak_of(command: list[str], env: dict) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, its output) of one whole process, measured by a parent of its own."""
    run = whole_process(command, env)
    if run["returncode"] != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed:\n{run['output'][-2000:]}")
    return run["peak_rss_mib"], run["seconds"], run["output"]


def main() -> None:
    """Build a tiny model and the data file, run the commands, print their peaks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=100, help="size of the huge row's prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dpokit-long-rows-") as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer([" ".join(WORDS)] * 50, 300, work / "model")
        random_llama(vocab=len(tokenizer), hidden=64, max_positions=512, layers=2, heads=4).save_pretrained(
            work / "model")
        data = work / "huge.jsonl"
        write_data(data, args.megabytes)
        print(f"data: {data.stat().st_size / 2**20:.0f} MiB, one line of {args.megabytes} MB", flush=True)
        env = quiet_environment()
        dpokit = [sys.executable, "-m", "dpokit.cli"]
        runs = {"eval": dpokit + ["eval", "--model", str(work / "model"), "--data", str(data), "--reference-free",
                                  "--max-length", "128", "--max-prompt-length", "64"],
                "dpo": dpokit + ["dpo", "--model", str(work / "model"), "--data", str(data), "--output",
                                 str(work / "run"), "--max-length", "128", "--max-prompt-length", "64",
                                 "--max-steps", "1", "--batch-size", "2", "--no-data-cache"]}
        for name, command in runs.items():
            peak, seconds, output = peak_of(command, env)
            said = [line for line in output.splitlines() if "cut 1 row" in line]
            print(f"dpokit {name}: peak RSS {peak:,.0f} MiB, {seconds:.1f} s; "
                  f"{said[0].strip() if said else 'no cut reported'}", flush=True)


if __name__ == "__main__":
    main()
