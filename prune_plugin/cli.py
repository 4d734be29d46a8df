"""The ``prune-plugin`` console script. With no subcommand it runs the main job.

    prune-plugin                     # sequential ROME on the embedded SmolLM2, without and with PRUNE
    prune-plugin run --method MEMIT --edits 10 --alpha 1.2 --mode online --out results/
    prune-plugin mine --data my_counterfact.json --limit 50 --threshold 1.5
    prune-plugin plot results/*.telemetry.jsonl --out plots/

Bad options print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .restraint import parse_alpha

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad option or input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; we want one clear line
        raise UsageError(message)


def _alphas(text: str) -> tuple:
    try:
        return tuple(parse_alpha(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--alpha {err}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .mainjob import METHODS, JobOptions

    d = JobOptions()
    parser = _Parser(prog="prune-plugin", description="PRUNE for sequential model editing: main job, miner, plots")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="the main job (the default)")
    run.add_argument("--method", default=d.method, type=str.upper, help=f"editing method: {', '.join(METHODS)}")
    run.add_argument("--edits", type=_positive, default=d.edits, help="number of sequential edits (default %(default)s)")
    run.add_argument("--alpha", type=_alphas, default="e",
                     help="PRUNE log base a > 1 (e, 2, 1.5, 1.2, ...) or 'linear'; several (e,1.2) run one arm each")
    run.add_argument("--mode", choices=("final", "online"), default=d.mode, help="restrain once at the end or after every edit")
    _model_options(run)
    run.add_argument("--hparams", help="EasyEdit hparams YAML for --model (default: the shipped one for SmolLM2)")
    run.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--eval-sentences", type=_positive, default=d.eval_sentences,
                     help="reference sentences scored by collapse_ppl after each arm")

    mine = sub.add_parser("mine", help="rank CounterFact-form records by the perplexity jump of a single edit")
    mine.add_argument("--method", default="ROME", type=str.upper)
    _model_options(mine)
    mine.add_argument("--hparams", help="EasyEdit hparams YAML for --model (default: the shipped one for SmolLM2)")
    mine.add_argument("--limit", type=_positive, help="mine only the first N records")
    mine.add_argument("--sentences", type=_positive, default=20, help="reference sentences scored per edit")
    mine.add_argument("--threshold", type=float, default=1.5, help="ppl ratio at which a record counts as hard")
    mine.add_argument("--out", default="mined", help="output folder: ranked.json and hardedit.json")

    plot = sub.add_parser("plot", help="plot telemetry files")
    plot.add_argument("telemetry", nargs="+", help="telemetry JSONL files")
    plot.add_argument("--out", default="plots")
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder or hub name (default: embedded SmolLM2-135M)")
    p.add_argument("--data", help="CounterFact-form edit records JSON (default: the shipped hard-case set)")


def _check_common(args: argparse.Namespace) -> None:
    from .mainjob import METHODS

    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r} (choose {', '.join(METHODS)})")
    if args.model and (os.sep in args.model or args.model.startswith(".")) and not Path(args.model).exists():
        raise UsageError(f"--model: no such model folder: {args.model}")
    if args.model and not args.hparams:
        raise UsageError("--model needs --hparams: an EasyEdit hparams YAML naming that model's modules")
    for option in ("data", "hparams"):
        path = getattr(args, option)
        if path and not os.access(path, os.R_OK):
            raise UsageError(f"--{option}: cannot read {path}")
    from .datasets import load_edit_records

    try:
        load_edit_records(args.data)  # a malformed file fails here, with file, record and field
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("run", "mine"):
            _check_common(args)
        return _dispatch(args)
    except UsageError as err:
        print(f"prune-plugin: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prune-plugin: interrupted (telemetry files so far stay readable; no model or cache was half-written)",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from .models import ModelError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "mine":
            return _mine(args)
        from .plots import plot_telemetry

        for path in plot_telemetry(args.telemetry, args.out):
            print(path)
        return 0
    except (ModelError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _run(args: argparse.Namespace) -> int:
    from .mainjob import JobOptions, format_table, run_job

    options = JobOptions(method=args.method, edits=args.edits, alphas=args.alpha, mode=args.mode, model=args.model,
                         hparams=args.hparams, data=args.data, out=args.out, seed=args.seed,
                         eval_sentences=args.eval_sentences)
    results = run_job(options)
    print()
    print(format_table(results))
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    for plot in results.get("plots", []):
        print(f"plot: {plot}")
    return 0


def _mine(args: argparse.Namespace) -> int:
    from .datasets import load_edit_records, load_reference_sentences, write_json
    from .easyedit.driver import build_editor, easyeditor_module, load_hparams
    from .mainjob import prepare_statistics, shipped_hparams
    from .miner import hard_subset, mine_hard_cases
    from .models import load_model
    from .plugins.guard import guard_sample

    easyeditor_module()
    records = load_edit_records(args.data)[: args.limit]
    model, tok = load_model(args.model)
    hparams = load_hparams(args.hparams or shipped_hparams(args.method))
    corpus = load_reference_sentences()
    prepare_statistics(model, tok, hparams, corpus)  # MEMIT's covariance, as the main job does
    editor = build_editor(hparams, model, tok)
    sentences = guard_sample(corpus, args.sentences)
    mined = mine_hard_cases(editor, records, sentences)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ranked.json", mined)
    hard = hard_subset(mined, args.threshold)
    write_json(out / "hardedit.json", hard)
    print(f"{len(hard)} of {len(mined)} records raised perplexity >= {args.threshold}x: {out / 'hardedit.json'}")
    for r in mined[:10]:
        print(f"  {r['ppl_ratio']:8.3f}x  {r['prompt']} -> {r['target_new']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
