"""Measure the demo model through the app: does it draw what the vocabulary asks, and how fast?

    python scripts/measure_demo_model.py                       # all 168 scenes, canonical wording, fp32
    python scripts/measure_demo_model.py --sample 96 --wordings all --precision bf16
    python scripts/measure_demo_model.py --json out.json

Every image goes through `Session.generate` with the app's defaults (sampler, steps, CFG,
native size) and is read back by studio.demo_shapes.read: centre colour, border colour and
shape, each against what the prompt asked. Seeds run 0, 1, 2, ... over the prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.demo_shapes import read  # noqa: E402
from studio.demo_vocab import FOLLOWED_TEMPLATES, TEMPLATES, all_scenes  # noqa: E402
from studio.request import GenerationRequest  # noqa: E402
from studio.session import Session  # noqa: E402
from studio.settings import Settings  # noqa: E402


def cases(sample: int, wordings: str, seed: int) -> list[tuple[object, int]]:
    templates = {"canonical": [0], "followed": list(FOLLOWED_TEMPLATES), "all": list(range(len(TEMPLATES)))}[wordings]
    every = [(scene, t) for scene in all_scenes() for t in templates]
    if sample and sample < len(every):
        every = random.Random(seed).sample(every, sample)
    return every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--wordings", default="canonical", choices=["canonical", "followed", "all"])
    parser.add_argument("--sample", type=int, default=0, help="a random sample of this many (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="for the sample")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="measure-demo-"))
    from studio.paths import AppDirs

    dirs = AppDirs(config=home / "config", data=home / "data", cache=home / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True)
    session = Session(Settings(device="cpu", precision=args.precision), dirs)
    load = session.load_model().load_seconds
    hits = {"colour": 0, "background": 0, "shape": 0, "all": 0}
    per_template: dict[int, list[bool]] = {}
    seconds, misses = [], []
    todo = cases(args.sample, args.wordings, args.seed)
    for i, (scene, template) in enumerate(todo):
        started = time.perf_counter()
        result = session.generate(GenerationRequest(prompt=scene.prompt(template), seed=i), out_path=home / "x.png")
        seconds.append(time.perf_counter() - started)
        reading = read(result.images[0])
        match = reading.matches(scene)
        for key, ok in match.items():
            hits[key] += ok
        hits["all"] += all(match.values())
        per_template.setdefault(template, []).append(all(match.values()))
        if not all(match.values()):
            misses.append(f"{scene.prompt(template)!r} seed {i}: read {reading.colour} {reading.shape or '?'} on "
                          f"{reading.background} (fill {reading.fill:.2f})")
    session.close()
    n = len(todo)
    summary = {"precision": session.runtime.dtype_name, "threads": torch.get_num_threads(), "images": n,
               "accuracy": {k: round(v / n, 4) for k, v in hits.items()},
               "all_right_by_wording": {TEMPLATES[t]: round(sum(v) / len(v), 4) for t, v in per_template.items()},
               "generate_seconds": {"median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3)},
               "model_load_seconds": round(load, 3), "misses": misses}
    print(json.dumps({k: v for k, v in summary.items() if k != "misses"}, indent=2))
    for line in misses[:20]:
        print("miss:", line)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
