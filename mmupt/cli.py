"""The `mmupt` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_settings
from .service import configure_logging

DEFAULT_CONFIG = "configs/tiny-cpu.yaml"


def _settings(args, overrides=None):
    return load_settings(args.config, overrides=overrides)


def cmd_run(args) -> int:
    from .run import RunFailed, run

    overrides = {"learner": {"max_steps": args.max_steps}} if args.max_steps is not None else None
    settings = _settings(args, overrides)
    if args.dry_run:
        return print_plan(settings, args.config)
    out = Path(args.out) if args.out else Path("runs") / time_tag()
    run_id = args.run_id
    if args.resume:
        if not (args.out and (out / "config.yaml").is_file()):
            print("mmupt run --resume needs --out DIR of an earlier run (DIR/config.yaml)", file=sys.stderr)
            return 2
        run_id = run_id or load_settings(out / "config.yaml", environ={}).run_id
    try:
        summary = run(settings, out, run_id, resume=args.resume)
    except RunFailed as exc:
        print(f"mmupt run failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "streams"}, indent=2))
    print(f"summary: {out / 'summary.json'}")
    return 0 if summary["status"] == "finished" else 130


def print_plan(settings, config_path: str) -> int:
    from .plan import PlanError, build_plan

    try:
        print(build_plan(settings, config_path).render())
    except PlanError as exc:
        print(f"mmupt: {exc}", file=sys.stderr)
        return 2
    return 0


def time_tag() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def cmd_service(args) -> int:
    settings = _settings(args)
    if args.command == "rollout":
        from .services.rollout.main import run
    elif args.command == "voter":
        from .services.voter.main import run
    else:
        from .services.learner.main import run

        return run(settings, resume=args.resume)
    return run(settings)


def cmd_eval(args) -> int:
    from .eval import BenchmarkError, EvalConfig, run_evaluation
    from .sampler import SamplerError

    overrides = {"rollout": {"backend": args.backend}} if args.backend else None
    settings = _settings(args, overrides)
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p,
                     max_tokens=args.max_tokens or settings.rollout.max_new_tokens, seed=args.seed,
                     batch_size=args.batch_size)
    out = Path(args.out) if args.out else Path("runs") / f"eval-{time_tag()}"
    try:
        run_evaluation(settings, args.benchmark, out, cfg, model_dir=args.model, url=args.url, limit=args.limit,
                       grader_name=args.grader, api_key=args.api_key, concurrency=args.concurrency)
    except (BenchmarkError, SamplerError, ValueError) as exc:
        print(f"mmupt eval: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_synth(args) -> int:
    import httpx

    from .data import DataError
    from .sampler import SamplerError
    from .synth.command import run_synthesis

    data = {"problem_column": args.problem_column, "images_column": args.images_column}
    settings = _settings(args, {"data": {k: v for k, v in data.items() if v}})
    try:
        run_synthesis(settings, args.seed_data, args.out, mode=args.mode, model_dir=args.model, url=args.url,
                      limit=args.limit, api_key=args.api_key, concurrency=args.concurrency)
    except (DataError, SamplerError, ValueError) as exc:
        print(f"mmupt synth: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"mmupt synth: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_build_tiny(args) -> int:
    from .model import build_tiny

    print(build_tiny(args.out, seed=args.seed))
    return 0


def cmd_make_base(args) -> int:
    from dataclasses import replace

    from .make_base import BaseRecipe, build_base

    changes = {k: v for k, v in {"seed": args.seed, "label_noise": args.label_noise, "clean_steps": args.clean_steps,
                                 "noisy_steps": args.noisy_steps}.items() if v is not None}
    print(build_base(args.out, replace(BaseRecipe(), **changes)))
    return 0


def cmd_make_data(args) -> int:
    from .shapes_task import write_dataset

    train, test = write_dataset(args.out, args.train, args.eval, args.seed, args.questions)
    print(f"{train}\n{test}")
    return 0


def cmd_vote(args) -> int:
    from .services.voter.main import vote_file_command

    overrides = {"voter": {"grader": args.grader}} if args.grader else None
    settings = load_settings(args.config, overrides=overrides)
    try:
        summary = vote_file_command(settings, args.input, args.output, progress=not args.quiet)
    except OSError as exc:
        print(f"mmupt vote: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmupt", description="Label-free post-training of multimodal LLMs (MM-UPT).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run rollout, voter and learner together (embedded server by default)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides learner.max_steps)")
    p.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    p.add_argument("--run-id", default=None, help="Redis key prefix of the run (default: a fresh one)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the plan (processes, GPUs, batch arithmetic, memory); start nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (same run id; with the embedded "
                        "server the learner rebuilds its ledger from the checkpoint)")
    p.set_defaults(func=cmd_run)

    for name, text in (("rollout", "the rollout server"), ("voter", "the voter"), ("learner", "the learner")):
        p = sub.add_parser(name, help=f"run {text} alone against redis_url / MMUPT_REDIS_URL")
        p.add_argument("--config", default=DEFAULT_CONFIG)
        if name == "learner":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint in learner.checkpoint_dir (none: from the start)")
        p.set_defaults(func=cmd_service)

    p = sub.add_parser("vote", help="majority-vote groups of responses offline (JSONL in, JSONL out)")
    p.add_argument("--input", required=True, help='JSONL: {"id", "responses": [...], "answer"?, "options"?} a line')
    p.add_argument("--output", required=True, help="JSONL: each input line plus majority, rewards, majority_ratio ...")
    p.add_argument("--grader", choices=["mathruler", "math_verify", "exact"], default=None,
                   help="answer equivalence (overrides voter.grader; default mathruler)")
    p.add_argument("--config", default=None, help="YAML whose voter section sets tie policy, min agreement ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("eval", help="evaluate a model or a rollout server on a benchmark file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face-format model folder, run in this process")
    source.add_argument("--url", help="a rollout server (its /v1/chat/completions)")
    p.add_argument("--benchmark", required=True, help="JSON/JSONL file (MathVista, MATH-V or We-Math style)")
    p.add_argument("--k", type=int, default=8, help="samples per question (avg@k, maj@k, pass@k)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per sample (default rollout.max_new_tokens)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="questions sampled together")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url")
    p.add_argument("--grader", default=None, help="answer equivalence (default voter.grader)")
    p.add_argument("--backend", choices=["transformers", "vllm"], default=None,
                   help="with --model (default rollout.backend)")
    p.add_argument("--api-key", default=None, help="bearer token for --url, if the server wants one")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("synth", help="synthesise new questions for seed images, filtered, in the training format")
    p.add_argument("--mode", choices=["in-context", "direct"], default=None,
                   help="in-context: image, seed question and answer shown; direct: the image only (default synth.mode)")
    p.add_argument("--seed-data", required=True, help="training-format file (parquet, JSONL, JSON) with the seed images")
    p.add_argument("--out", required=True, help="output file, .jsonl (images beside it) or .parquet")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="Hugging Face-format model folder, run in this process (default model.path)")
    source.add_argument("--url", help="a rollout server (its /v1/chat/completions)")
    p.add_argument("--limit", type=int, default=None, help="only the first N seeds")
    p.add_argument("--problem-column", default=None, help="the seed file's question column (default data.problem_column)")
    p.add_argument("--images-column", default=None, help="the seed file's image column (default data.images_column)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url")
    p.add_argument("--api-key", default=None, help="bearer token for --url, if the server wants one")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML whose synth section sets the filters")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("build-tiny", help="build the tiny offline Qwen2.5-VL into a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("make-base", help="build the weak tiny base model of the learning demo (SFT with labels)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--label-noise", type=float, default=None, help="share of wrong answers in the noisy stage")
    p.add_argument("--clean-steps", type=int, default=None)
    p.add_argument("--noisy-steps", type=int, default=None)
    p.set_defaults(func=cmd_make_base)

    p = sub.add_parser("make-data", help="write the synthetic shapes task (train and held-out splits)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", nargs="+", default=["color"],
                   choices=["color", "count", "count_color", "count_kind"], help="question types (default: color)")
    p.set_defaults(func=cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mmupt: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
