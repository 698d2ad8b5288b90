"""Headless command line: `generate` (one image or a jobs file), `grid` (X/Y/Z) and `bake`, in one warm session.

`launch.py` adds the UI on top; this module never imports gradio. Errors print one
line on stderr and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from studio.errors import StudioError

log = logging.getLogger(__name__)
EXIT_INPUT, EXIT_OTHER, EXIT_CANCELLED = 2, 1, 130


def add_common_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options valid before or after the command (`--model X generate` and `generate --model X`)."""
    default: dict = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--model", help="diffusers folder, SDXL .safetensors file, or hub id "
                                        "(default: the settings' model, else the built-in tiny demo model)", **default)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the settings' device", **default)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="override the settings' precision", **default)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs", **default)


def lora_arg(text: str) -> tuple:
    """NAME_OR_PATH[:WEIGHT[:UNET][:lbw=..][:start=..][:stop=..]] -> a request entry; the weight defaults to 1.

    The same arguments as a prompt tag (studio.lora.spec): `--lora "name:1:lbw=INS"`. The name
    ends before the first part that is a number or a key=value (so a path may hold colons).
    """
    from studio.errors import SettingsError
    from studio.lora.spec import NUMBER, parse_args

    parts = text.split(":")
    cut = next((i for i in range(1, len(parts)) if NUMBER.fullmatch(parts[i].strip()) or "=" in parts[i]),
               len(parts))
    try:
        return parse_args(":".join(parts[:cut]), parts[cut:]).entry()
    except SettingsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="NAME_OR_PATH:WEIGHT",
                        help="apply a LoRA (repeatable); a name is looked up in the LoRA folders. The prompt "
                             "tag's arguments work too: NAME:TE:UNET, NAME:1:lbw=INS (block weights), "
                             "NAME:1:start=5:stop=0.5 (step range)")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="also look for LoRAs in DIR (repeatable; added to the settings' folders)")


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """The flags that describe one image (generate, and the base request of a grid)."""
    parser.add_argument("--prompt", help="the prompt (required unless --jobs)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--seed", type=int, default=-1, help="seed; -1 picks a random one (default)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: settings, 20)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance scale (default: settings, 5)")
    parser.add_argument("--width", type=int, default=0, help="width, multiple of 8 (default: the model's native size)")
    parser.add_argument("--height", type=int, default=0, help="height, multiple of 8 (default: native size)")
    parser.add_argument("--sampler", default="Euler",
                        help="Euler, 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras', DDIM, UniPC")
    add_lora_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="LoRA Studio: SDXL with stacked LoRAs. Without a command it starts the browser UI.",
    )
    add_common_options(parser)
    parser.add_argument("--port", type=int, help="UI port (default: the settings' port, 7860)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--share", action="store_true",
                        help="also open a public Gradio link (login required; a password is generated if none is set)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("ui", help="start the browser UI (the default)")
    gen = sub.add_parser("generate", help="generate headless and print a short report",
                         description="Generate one image, or every line of a jobs file in one warm session.")
    add_common_options(gen, suppress=True)
    add_request_options(gen)
    gen.add_argument("--out", type=Path, help="write the PNG here (default: the outputs folder)")
    gen.add_argument("--report", type=Path, help="write the report JSON here")
    gen.add_argument("--jobs", type=Path, help="a JSONL file: one request object per line "
                                               "(keys: prompt, negative, seed, steps, cfg, width, height, sampler, "
                                               "loras: [[name, weight], [name, weight, \"lbw=INS:stop=10\"], "
                                               "...]; <lora:name:weight> tags work too)")
    gen.add_argument("--out-dir", type=Path, help="with --jobs: write NNNN.png and NNNN.json here")
    grid = sub.add_parser("grid", help="an X/Y/Z grid: one image per combination of axis values, and grid.png",
                          description="Generate every combination of up to three axes (A1111's X/Y/Z plot), in "
                                      "the order that changes the fewest LoRA weights. Axes: lora:NAME=w1,w2 "
                                      "(weights), lbw:NAME=INS,OUTD,\"1,0,...\" (block weights), seed=, steps=, "
                                      "cfg=, sampler=, prompt_sr=search,repl1,... , size=WxH,..., "
                                      "stack=\"<lora:a:1>\",\"\" (whole stacks).")
    add_common_options(grid, suppress=True)
    add_request_options(grid)
    for axis in ("x", "y", "z"):
        grid.add_argument(f"--{axis}", metavar="AXIS", help=f"the {axis} axis, e.g. \"lora:demo-kohya-warm=0,0.5,1\"")
    grid.add_argument("--out-dir", type=Path, required=True,
                      help="write cell-x*-y*-z*.png, grid.png and grid.json here")
    bake = sub.add_parser("bake", help="write the model with a LoRA stack merged in, as a diffusers folder",
                          description="Merge LoRAs into the model's weights (exactly as generation applies them) "
                                      "and write a diffusers folder that loads back as a model.")
    add_common_options(bake, suppress=True)
    add_lora_options(bake)
    bake.add_argument("--out", type=Path, required=True, help="the diffusers folder to write (must not exist, or empty)")
    bake.add_argument("--single-file", type=Path, help="also write one SDXL .safetensors checkpoint (original layout)")
    return parser


def _session(args: argparse.Namespace):
    from studio.paths import app_dirs
    from studio.session import Session
    from studio.settings import load_settings

    dirs = app_dirs()
    settings = load_settings(dirs.settings_file)
    overrides = {k: getattr(args, k) for k in ("model", "device", "precision") if getattr(args, k, None)}
    if getattr(args, "lora_dir", None):
        overrides["lora_dirs"] = [*args.lora_dir, *settings.lora_dirs]
    if overrides:
        settings = settings.replace(**overrides)
    return Session(settings, dirs)


def _request_from_args(args: argparse.Namespace, settings):
    """The request the flags describe, validated (a GenerationRequest)."""
    from studio.request import GenerationRequest

    if not args.prompt:
        from studio.errors import SettingsError

        jobs = " (or --jobs FILE.jsonl)" if args.command == "generate" else ""
        raise SettingsError(f"{args.command} needs --prompt TEXT{jobs}")
    return GenerationRequest(prompt=args.prompt, negative=args.negative, seed=args.seed,
                             steps=args.steps if args.steps is not None else settings.default_steps,
                             cfg=args.cfg if args.cfg is not None else settings.default_cfg,
                             width=args.width, height=args.height, sampler=args.sampler,
                             loras=tuple(args.lora)).validated()


def _read_jobs(path: Path, session) -> list:
    """Every line checked, LoRA names found, before the model loads: the session's Jobs.

    Every bad line is reported, not just the first, so a long jobs file is fixed in one pass.
    """
    from studio.errors import SettingsError
    from studio.request import GenerationRequest

    settings = session.settings

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SettingsError(f"{path}: cannot read the jobs file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise SettingsError(f"{path}: the jobs file is not UTF-8 text ({err.reason} at byte {err.start})") from None
    jobs, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path.name} line {number}: not JSON ({err.msg})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path.name} line {number}: expected a JSON object")
            continue
        data = {"steps": settings.default_steps, "cfg": settings.default_cfg, **data}
        try:
            jobs.append(session.prepare(GenerationRequest.from_dict(data), allow_paths=True))  # local: paths too
        except StudioError as err:
            problems.append(f"{path.name} line {number}: {err}")
    if problems:
        head = "" if len(problems) == 1 else f"{len(problems)} bad lines; nothing was run:\n"
        raise SettingsError(head + "\n".join(problems))
    if not jobs:
        raise SettingsError(f"{path.name}: no jobs in the file")
    return jobs


def run_generate(args: argparse.Namespace) -> int:
    session = _session(args)
    if args.jobs:
        if not args.out_dir:
            from studio.errors import SettingsError

            raise SettingsError("--jobs needs --out-dir DIR (where NNNN.png and NNNN.json are written)")
        jobs = _read_jobs(args.jobs, session)  # all lines checked before the model loads
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for index, job in enumerate(jobs, 1):
            result = session.generate(job, out_path=args.out_dir / f"{index:04d}.png")
            result.report.write_json(args.out_dir / f"{index:04d}.json")
            print(f"[{index}/{len(jobs)}] {result.paths[0]}  seed {result.seeds[0]}")
            print("  " + result.report.summary().replace("\n", "\n  "))
        return 0
    request = _request_from_args(args, session.settings)
    result = session.generate(request, out_path=args.out, allow_paths=True)  # the local command line: paths too
    if args.report:
        result.report.write_json(args.report)
    print(f"{result.paths[0]}  seed {result.seeds[0]}")
    print(result.report.summary())
    return 0


def run_grid_command(args: argparse.Namespace) -> int:
    from studio.grid import parse_axis, plan_grid, run_grid, summary

    from studio.errors import SettingsError

    axes = [parse_axis(text) if text else None for text in (args.x, args.y, args.z)]  # bad input: before the model
    if not any(axes):
        raise SettingsError("grid needs at least one axis: --x \"lora:NAME=0,0.5,1\" (and --y, --z)")
    session = _session(args)
    plan = plan_grid(session, _request_from_args(args, session.settings), axes)  # every cell checked first
    shape = "x".join(str(n) for n in plan.shape if n > 1) or "1"
    print(f"grid {shape}: {len(plan.order)} cells, order: {plan.order_method}")

    def on_cell(index: int, total: int, cell: tuple[int, ...]) -> None:
        where = ", ".join(f"{n}={a.values[i]}" for n, a, i in zip("xyz", plan.axes, cell) if a is not None)
        print(f"cell {index}/{total} ({where})", flush=True)

    result = run_grid(session, plan, args.out_dir, on_cell=on_cell)
    print(f"{result.image}  ({len(result.results)} of {len(plan.order)} cells; {result.json})")
    print(summary(result))
    return 0


def run_bake(args: argparse.Namespace) -> int:
    session = _session(args)
    result = session.bake(list(args.lora), args.out, args.single_file, allow_paths=True)
    loras = ", ".join(f"{row['name']}:{row['weight']:g}" + (" (block weights)" if row.get("blocks") else "")
                      for row in result.stack)
    print(f"baked {loras} into {result.out_dir} ({result.modules_patched} layers, "
          f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f}s")
    if result.single_file:
        print(f"single file: {result.single_file}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a headless command; map engine errors to one line and an exit code."""
    from studio.errors import Cancelled, InputError

    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "bake":
            return run_bake(args)
        if args.command == "grid":
            return run_grid_command(args)
        raise StudioError(f"unknown command {args.command!r}")
    except StudioError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CANCELLED if isinstance(err, Cancelled) else EXIT_INPUT if isinstance(err, InputError) else EXIT_OTHER
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")  # library deprecation chatter is not for users
        for noisy in ("diffusers", "transformers"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
