"""Finish the 200k bench round that `timeout 3600` cut short: the streamed cached child, then two more interleaved
rounds of the two cached runs (cheap), and write the JSON/table with bench_data's own functions."""
import json, sys, time, platform, os
from pathlib import Path
sys.path.insert(0, "/work/main/bench")
import bench_data as b

work = Path("/tmp/dpokit-bench-data-gq96a6xi")
results = {}
for name in ("first-200000-0", "cached-200000-0", "streamed-first-200000-0"):
    run = name.rsplit("-", 2)[0].replace("streamed-", "streamed ")
    results.setdefault(f"{run}-200000", []).append(json.loads((work / f"result-{name}.json").read_text()))
for t in ("1", "2"):
    results[f"tokenizer-{t}-thread"] = [json.loads((work / f"result-tokenizer-{t}-thread.json").read_text())]
base = json.loads((work / "spec-cached-200000-0.json").read_text())
base.pop("result"); base.pop("output")
order = [("streamed cached", 0), ("cached", 1), ("streamed cached", 1), ("cached", 2), ("streamed cached", 2)]
for run, k in order:
    spec = dict(base, streaming=run.startswith("streamed"))
    r = b.run_child(spec, work, f"{run.replace(' ', '-')}-200000-{k}")
    results.setdefault(f"{run}-200000", []).append(r)
    print(run, k, r.get("seconds"), r.get("peak_rss_mib"), r.get("loadavg_before"), flush=True)
markdown = b.table(results, [200000], [])
print(markdown)
out = Path("/tmp/bench200/data-200k-streaming.json")
out.write_text(json.dumps({"command": "python bench/bench_data.py --sizes 200000 --legacy-sizes '' --streaming-sizes 200000 --rounds 2 (cut by a 1-hour timeout after round 1's streamed first run); the cached runs repeated 3x interleaved by /tmp finish script",
                           "results": results, "table_markdown": markdown,
                           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}, indent=1))
