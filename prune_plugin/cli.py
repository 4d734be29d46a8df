"""The ``prune-plugin`` console script. With no subcommand it runs the main job.

    prune-plugin                     # sequential ROME on the embedded SmolLM2, without and with PRUNE
    prune-plugin run --method MEMIT --edits 10 --alpha 1.2 --mode online --out results/
    prune-plugin mine --data my_counterfact.json --limit 50 --threshold 1.5
    prune-plugin plot results/*.telemetry.jsonl --out plots/
    prune-plugin run --edits 240 --checkpoints 0,25,50,100,150,200,240 --alpha e,1.2 --out long/   # --resume after a crash
    prune-plugin restrain long/checkpoints/edits/edit-000240 --alpha e,2,1.5,1.2,linear --out restrained/
    prune-plugin eval long/checkpoints/edits/edit-000240@1.2 --tasks collapse_ppl

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


def _counts(text: str) -> tuple:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be edit counts separated by commas, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"edit counts must be >= 0, got {text!r}")
    return counts


def _names(text: str) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("needs at least one task name")
    return names


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .experiment import METHODS, JobOptions

    d = JobOptions()
    parser = _Parser(prog="prune-plugin", description="PRUNE for sequential model editing: main job, miner, plots")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="the main job (the default)")
    run.add_argument("--method", default=d.method, type=str.upper, help=f"editing method: {', '.join(METHODS)}")
    run.add_argument("--edits", type=_positive, default=d.edits, help="number of sequential edits (default %(default)s)")
    run.add_argument("--alpha", type=_alphas, default="e,1.2",
                     help="PRUNE log bases a > 1 (e, 2, 1.5, 1.2, ...) or 'linear': one arm each, all restraining "
                          "the same edits (default %(default)s)")
    run.add_argument("--mode", choices=("final", "online"), default=d.mode, help="restrain once at the end or after every edit")
    _model_options(run)
    run.add_argument("--hparams", help="EasyEdit hparams YAML for --model (default: the shipped one for SmolLM2)")
    run.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--eval-sentences", type=_positive, default=d.eval_sentences,
                     help="reference sentences scored by collapse_ppl after each arm")
    run.add_argument("--checkpoints", type=_counts, default=None,
                     help="edit counts to checkpoint and evaluate at, e.g. 0,25,50,100 (default: 4 evenly spaced)")
    run.add_argument("--tasks", type=_names, default=",".join(d.tasks),
                     help="lm-eval tasks evaluated on every branch (default %(default)s)")
    run.add_argument("--general-at", type=_counts, default=None,
                     help="edit counts at which the tasks other than hardedit and collapse_ppl (prune_general) are "
                          "evaluated, e.g. 0,100,240 (default: 0 and the last edit)")
    run.add_argument("--prune-tasks-dir",
                     help="folder with PRUNE's four official task files, for prune_general (default: $PRUNE_TASKS_DIR, "
                          "else the small sets shipped with the plugin, not comparable with the paper)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out from its last complete checkpoints")
    run.add_argument("--no-easyedit-metrics", dest="easyedit_metrics", action="store_false",
                     help="skip EasyEdit's own pre/post scoring of each request (same weights; faster long runs)")

    restrain = sub.add_parser("restrain", help="apply PRUNE bases to a checkpoint (edit once, restrain many)")
    restrain.add_argument("checkpoint", help="a checkpoint folder (edit-NNNNNN) or a run's checkpoint directory")
    restrain.add_argument("--alpha", type=_alphas, default="e", help="PRUNE bases, e.g. e,2,1.5,1.2,linear")
    restrain.add_argument("--out", help="write each restrained state as a checkpoint here (default: only report)")

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint, or a restrained variant (CHECKPOINT@ALPHA)")
    evaluate.add_argument("checkpoint", help="checkpoint folder, optionally @ALPHA (e.g. ckpt/edit-000200@1.2)")
    evaluate.add_argument("--tasks", type=_names, default=",".join(d.tasks), help="lm-eval tasks (default %(default)s)")
    evaluate.add_argument("--model", help="the base model, if not where the checkpoint was written from")
    evaluate.add_argument("--metadata", type=_json_object, default={},
                          help="lm-eval task metadata as JSON, e.g. '{\"hardedit_path\": \"edits.json\"}'")
    evaluate.add_argument("--limit", type=float, help="evaluate only this many (or this fraction of) documents per task")
    evaluate.add_argument("--out", help="write the results as JSON to this file")

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
    from .experiment import METHODS

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
    from .experiment import GENERAL_TASKS, check_prune_tasks

    try:
        load_edit_records(args.data)  # a malformed file fails here, with file, record and field
        if args.command == "run" and any(t in GENERAL_TASKS for t in args.tasks):
            check_prune_tasks(args.prune_tasks_dir)  # before the editing run, not an hour later
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
    from .checkpoint import CheckpointError
    from .models import ModelError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "mine":
            return _mine(args)
        if args.command == "restrain":
            return _restrain(args)
        if args.command == "eval":
            return _eval(args)
        from .plots import plot_telemetry

        for path in plot_telemetry(args.telemetry, args.out):
            print(path)
        return 0
    except (ModelError, FileNotFoundError, CheckpointError) as err:
        raise UsageError(str(err)) from None


def _run(args: argparse.Namespace) -> int:
    from .experiment import JobOptions, format_table, run_job

    options = JobOptions(method=args.method, edits=args.edits, alphas=args.alpha, mode=args.mode, model=args.model,
                         hparams=args.hparams, data=args.data, out=args.out, seed=args.seed,
                         eval_sentences=args.eval_sentences, checkpoints=args.checkpoints, tasks=args.tasks,
                         general_at=args.general_at, prune_tasks_dir=args.prune_tasks_dir, resume=args.resume,
                         easyedit_metrics=args.easyedit_metrics)
    results = run_job(options)
    print()
    print(format_table(results))
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    for plot in results.get("plots", []):
        print(f"plot: {plot}")
    return 0


def _restrain(args: argparse.Namespace) -> int:
    from .branches import restrain_checkpoint

    for done in restrain_checkpoint(args.checkpoint, args.alpha, args.out):
        for name, figures in done["figures"].items():
            print(f"a={done['alpha']}  {name}: {figures['restrained']} of {figures['rank']} singular values restrained "
                  f"(smax(dW) {figures['smax_delta']:.4g}, smax(W0) {figures['smax_original']:.4g})")
        if done["written"] is not None:
            print(f"  written: {done['written']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .branches import evaluate_branch, parse_branch

    try:
        location, alpha = parse_branch(args.checkpoint)
    except ValueError as err:
        raise UsageError(str(err)) from None
    results = evaluate_branch(location, alpha, args.tasks, model=args.model, metadata=args.metadata or None,
                              limit=args.limit)
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "_stderr" not in k)
        print(f"{task}: {shown}")
    if args.out:
        import json

        from .datasets import write_json

        write_json(args.out, json.loads(json.dumps(results, default=str)))
        print(f"results: {args.out}")
    return 0


def _mine(args: argparse.Namespace) -> int:
    from .miner import mine_to_folder

    found = mine_to_folder(method=args.method, model=args.model, hparams=args.hparams, data=args.data,
                           limit=args.limit, sentences=args.sentences, threshold=args.threshold, out=args.out)
    mined, hard = found["mined"], found["hard"]
    print(f"{len(hard)} of {len(mined)} records raised perplexity >= {args.threshold}x: {found['hard_path']}")
    for r in mined[:10]:
        print(f"  {r['ppl_ratio']:8.3f}x  {r['prompt']} -> {r['target_new']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
