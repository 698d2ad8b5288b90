"""Model load of the embedded tiny model: where the time goes, in fresh processes.

    python -m bench.model_load --runs 5                      # this checkout
    python -m bench.model_load --runs 5 --root /other/clone  # another checkout, e.g. before a change
    python -m bench.model_load --runs 5 --root . --root /other/clone   # both, interleaved run by run

Each run is a new Python process (the first load in a process pays the diffusers/transformers
imports, as `make run` and `launch.py generate` do): import `studio.session`, load the model, load
it again (a switch: unload + load), close. Prints medians over the runs, with the parts the session
reports (`ModelInfo.load_parts`, where the checkout has them); `--json` writes every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
t0 = time.perf_counter()
from studio.session import Session
from studio.settings import Settings
from studio.paths import AppDirs
t1 = time.perf_counter()
root = Path(tempfile.mkdtemp())
dirs = AppDirs(root / "config", root / "data", root / "cache")
for d in (dirs.config, dirs.data, dirs.cache):
    d.mkdir(parents=True)
session = Session(Settings(device="cpu", precision=sys.argv[1]), dirs)
t2 = time.perf_counter()
first = session.load_model()
t3 = time.perf_counter()
second = session.load_model()
t4 = time.perf_counter()
session.close()
t5 = time.perf_counter()
print(json.dumps({"import_session": t1 - t0, "first_load": t3 - t2, "first_reported": first.load_seconds,
                  "switch": t4 - t3, "switch_reported": second.load_seconds, "close": t5 - t4,
                  "first_parts": getattr(first, "load_parts", {}), "switch_parts": getattr(second, "load_parts", {})}))
"""


def one_run(root: Path, precision: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", _CHILD, precision], cwd=root, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    table = {k: statistics.median(r[k] for r in runs) for k in keys}
    for parts in ("first_parts", "switch_parts"):
        names = runs[0].get(parts) or {}
        table.update({f"{parts}.{n}": statistics.median(r[parts][n] for r in runs) for n in names})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", action="append", type=Path, help="checkout(s) to measure (default: this one)")
    parser.add_argument("--precision", default="fp32", help="fp32 keeps the probe out of the numbers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    roots = [r.resolve() for r in (args.root or [Path(__file__).resolve().parent.parent])]
    runs: dict[str, list[dict]] = {str(r): [] for r in roots}
    for _ in range(args.runs):
        for root in roots:  # interleaved, so background load hits every checkout alike
            runs[str(root)].append(one_run(root, args.precision))
    for root, results in runs.items():
        print(f"{root}: medians of {len(results)} runs")
        for name, seconds in medians(results).items():
            print(f"  {name:28s} {seconds:7.3f} s")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
