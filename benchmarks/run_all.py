"""Run every benchmark, one after another, and collect their results.

    python benchmarks/run_all.py [--quick] [--skip NAME ...]

Each benchmark runs as its own process (its output is shown as it runs).
Afterwards benchmarks/results/summary.md holds every benchmark's printed
tables, and benchmarks/results/all.json every JSON result file, next to
the command line and wall time of each run. ``--quick`` passes smaller
workloads where a benchmark has them (fewer refits, N up to 50,000).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"

# name -> (script, full arguments, quick arguments)
BENCHMARKS = {
    "paper_table": ("paper_table.py", [], ["--refits", "5", "--seq-folds", "10"]),
    "solver": ("solver.py", [], []),
    "query_throughput": ("query_throughput.py", [], ["--queries", "20000"]),
    "scaling": ("scaling.py", ["--big-p"], ["--sizes", "10000", "50000"]),
    "retrain_agreement": ("retrain_agreement.py", [], ["--models", "lr"]),
    "cv_vs_retraining": ("cv_vs_retraining.py", [], ["--folds-retrain", "3"]),
    "removal_vs_derivative": ("removal_vs_derivative.py", [], []),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(BENCHMARKS))
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    sections, runs = [], {}
    for name, (script, full, quick) in BENCHMARKS.items():
        if name in args.skip:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(proc.stdout[-4000:], flush=True)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr, flush=True)
        runs[name] = {"command": cmd[1:], "seconds": seconds, "rc": proc.returncode}
        sections.append(
            f"## {name}\n\n`python {' '.join(cmd[1:])}` "
            f"({seconds:.0f} s, exit {proc.returncode})\n\n```\n{proc.stdout.strip()}\n```\n"
        )
    collected = {
        p.stem: json.loads(p.read_text())
        for p in sorted(RESULTS.glob("*.json"))
        if p.stem != "all"
    }
    (RESULTS / "all.json").write_text(
        json.dumps({"runs": runs, "results": collected}, indent=2, default=float)
    )
    (RESULTS / "summary.md").write_text("# Benchmark results\n\n" + "\n".join(sections))
    print(f"wrote {RESULTS / 'summary.md'} and {RESULTS / 'all.json'}")
    sys.exit(max((r["rc"] for r in runs.values()), default=0))


if __name__ == "__main__":
    main()
