#!/usr/bin/env python3
"""LoRA Studio entry point: the browser UI by default; `generate` runs headless.

    python launch.py                      # UI on the built-in tiny demo model
    python launch.py --model sdxl.safetensors --port 7861 --no-browser
    python launch.py generate --prompt "a cat" --seed 1 --out a.png
    python launch.py generate --jobs jobs.jsonl --out-dir out/
    python launch.py grid --prompt "a cat" --seed 1 --x "lora:demo-kohya-warm=0,0.5,1" --out-dir grid/
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: telemetry threads hang exit
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notes about torchvision are noise
    from studio.cli import build_parser, configure_logging, run

    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    if args.command in (None, "ui"):
        from ui.server import serve

        return serve(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
