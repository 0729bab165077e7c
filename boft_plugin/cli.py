"""``boft-plugin`` command line (also ``python -m boft_plugin``).

    boft-plugin sft --config recipe.yaml [--key value ...]   # TRL SFT with a BOFT adapter
    boft-plugin dpo --config recipe.yaml [--key value ...]   # TRL DPO with a BOFT adapter
    boft-plugin kto --config recipe.yaml [--key value ...]   # TRL KTO (unpaired preferences) with a BOFT adapter
    boft-plugin grpo --config recipe.yaml [--key value ...]  # TRL GRPO (online RL, reward_funcs) with a BOFT adapter
    boft-plugin rloo --config recipe.yaml [--key value ...]  # TRL RLOO (online RL, reward_funcs) with a BOFT adapter
    boft-plugin verify OUTPUT_DIR                            # reload exports with stock PEFT, compare logits
    boft-plugin convert --single-factor SRC DST              # an m > 1 adapter as the equal m = 1 adapter
    boft-plugin convert --to-lora SRC DST --rank R           # a LoRA adapter for LoRA-only servers (or --max-error)
    boft-plugin demo [--workdir DIR]                         # the main job (SFT then DPO on 2 gloo ranks)

``sft`` / ``dpo`` / ``kto`` / ``grpo`` / ``rloo`` run in the current process, which may be one rank of
``torch.distributed.run`` or ``accelerate launch`` (e.g. ``accelerate launch --config_file
integrations/accelerate/zero3.yaml -m boft_plugin sft --config examples/sft_recipe.yaml``). ``boft-plugin sft
--help`` lists every key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _train(task: str, argv: list[str]) -> int:
    from .errors import RecipeError
    from .recipes.parsing import make_parser, parse_recipe

    if any(flag in argv for flag in ("-h", "--help")):
        make_parser(task).print_help()
        return 0
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node, before anything can wait on a lock
        from .runtime.extension_locks import warn_about_stale_extension_locks

        warn_about_stale_extension_locks()
    try:
        recipe = parse_recipe(task, argv)
        from .recipes.train import run

        run(recipe, end=True)
        code = 0
    except RecipeError as err:
        print(f"boft-plugin {task}: error: {err}", file=sys.stderr)
        code = 2
    from .runtime.process_exit import exit_after_distributed_run, launched_distributed

    if launched_distributed():  # gloo threads outlive destroy_process_group (torch 2.13): no teardown under them
        exit_after_distributed_run(code)
    return code


def _verify(argv: list[str]) -> int:
    """Reload runs' adapters with stock PEFT (and merged/ with transformers) in this process and compare logits."""
    from .export.verify import DEFAULT_TOLERANCE, VerifyError, verify_outputs

    parser = argparse.ArgumentParser(prog="boft-plugin verify", description=_verify.__doc__)
    parser.add_argument("output_dirs", nargs="+", help="runs' output_dir (adapter files and probe_logits.pt)")
    parser.add_argument("--base_model", default=None, help="base model (default: the adapter config's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max relative logit error")
    parser.add_argument(
        "--merged",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also check <output_dir>/merged (default: when it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print each report as one JSON line")
    args = parser.parse_args(argv)
    failed = False
    for output_dir in args.output_dirs:
        try:
            report = verify_outputs(output_dir, base_model=args.base_model, merged=args.merged)
        except VerifyError as err:
            print(f"boft-plugin verify: error: {err}", file=sys.stderr)
            return 2
        result = report.as_dict(args.tolerance)
        failed |= not result["ok"]
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print("\n".join(f"{key}: {value}" for key, value in result.items()), flush=True)
    return 1 if failed else 0


def _convert(argv: list[str]) -> int:
    """Write an adapter directory (ours or stock PEFT's) in another form: the exactly equivalent single-factor BOFT
    adapter, or a LoRA adapter for LoRA-only servers (with the error it costs)."""
    from .export.lora_report import SERVER_RANKS
    from .ops.single_factor import DEFAULT_ATOL, DEFAULT_MIN_DIST

    parser = argparse.ArgumentParser(prog="boft-plugin convert", description=_convert.__doc__)
    form = parser.add_mutually_exclusive_group(required=True)
    form.add_argument(
        "--single-factor",
        action="store_true",
        help="write the m = 1 adapter with block size b * 2**(m-1) that stock PEFT loads without its CUDA extension",
    )
    form.add_argument(
        "--to-lora",
        action="store_true",
        help="write a PEFT LoRA adapter: the truncated SVD of each layer's weight delta (see docs/lora.md)",
    )
    parser.add_argument("source", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("target", help="new directory for the converted adapter")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="single factor: max round-trip error")
    parser.add_argument("--min-dist", type=float, default=DEFAULT_MIN_DIST, help="single factor: min |1 + eigenvalue|")
    lora = parser.add_argument_group("--to-lora")
    lora.add_argument("--rank", type=int, default=None, help="the LoRA rank of every layer")
    lora.add_argument(
        "--max-error",
        type=float,
        default=None,
        help="instead of --rank: per layer the smallest rank whose relative Frobenius error of the delta is <= E",
    )
    lora.add_argument("--max-rank", type=int, default=None, help="with --max-error: the largest rank allowed")
    lora.add_argument("--ranks", choices=sorted(SERVER_RANKS), default=None, help="snap ranks up to a server's ranks")
    lora.add_argument("--base_model", default=None, help="full-precision safetensors base (default: the adapter's)")
    lora.add_argument("--prompt-file", default=None, help="probe text (default: the run's probe_logits.pt input)")
    lora.add_argument("--no-probe", action="store_true", help="skip the probe (it loads the whole model)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty target directory")
    args = parser.parse_args(argv)
    if args.to_lora:
        return _convert_to_lora(args)
    lora_only = [
        flag
        for flag, value in (
            ("--rank", args.rank),
            ("--max-error", args.max_error),
            ("--max-rank", args.max_rank),
            ("--ranks", args.ranks),
            ("--base_model", args.base_model),
            ("--prompt-file", args.prompt_file),
            ("--no-probe", args.no_probe or None),
        )
        if value is not None
    ]
    if lora_only:
        parser.error(f"{', '.join(lora_only)}: options of --to-lora, not of --single-factor")
    from .export.single_factor import SingleFactorError, convert_to_single_factor

    try:
        summary = convert_to_single_factor(
            args.source, args.target, atol=args.atol, min_dist=args.min_dist, overwrite=args.overwrite
        )
    except (SingleFactorError, OSError) as err:
        print(f"boft-plugin convert: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"target": args.target, **summary}), flush=True)
    return 0


def _convert_to_lora(args: argparse.Namespace) -> int:
    """``convert --to-lora``: 0 written, 1 the error budget cannot be met (report printed, nothing written), 2 error."""
    from .errors import LoraBudgetError, LoraConversionError
    from .export.lora_convert import convert_to_lora
    from .runtime.process_memory import limit_heap_retention

    limit_heap_retention()  # CPU-only hosts: each freed layer's delta and SVD go back to the OS

    def show(report) -> None:
        data = report.as_dict()
        data.pop("layers")
        print("\n".join(report.summary_lines()), flush=True)
        print(json.dumps({"target": args.target, **data}), flush=True)

    try:
        report = convert_to_lora(
            args.source,
            args.target,
            rank=args.rank,
            max_error=args.max_error,
            max_rank=args.max_rank,
            ranks=args.ranks,
            base_model=args.base_model,
            probe=not args.no_probe,
            prompt_file=args.prompt_file,
            overwrite=args.overwrite,
        )
    except LoraBudgetError as err:
        show(err.report)
        print(f"boft-plugin convert: error: {err}", file=sys.stderr)
        return 1
    except (LoraConversionError, OSError) as err:
        print(f"boft-plugin convert: error: {err}", file=sys.stderr)
        return 2
    show(report)
    return 0


def _demo(argv: list[str]) -> int:
    from .demo.main_job import main as main_job

    return main_job(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("sft", "dpo", "kto", "grpo", "rloo"):
        return _train(command, rest)
    if command == "verify":
        return _verify(rest)
    if command == "convert":
        return _convert(rest)
    if command == "demo":
        return _demo(rest)
    if command in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    print(f"boft-plugin: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
