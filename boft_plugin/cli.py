"""``boft-plugin`` command line (also ``python -m boft_plugin``).

    boft-plugin sft --config recipe.yaml [--key value ...]   # TRL SFT with a BOFT adapter
    boft-plugin dpo --config recipe.yaml [--key value ...]   # TRL DPO with a BOFT adapter
    boft-plugin verify OUTPUT_DIR                            # reload exports with stock PEFT, compare logits
    boft-plugin convert --single-factor SRC DST              # an m > 1 adapter as the equal m = 1 adapter
    boft-plugin demo [--workdir DIR]                         # the main job (SFT then DPO on 2 gloo ranks)

``sft`` / ``dpo`` run in the current process, which may be one rank of ``torch.distributed.run`` or
``accelerate launch`` (e.g. ``accelerate launch --config_file integrations/accelerate/zero3.yaml -m boft_plugin sft
--config examples/sft_recipe.yaml``). ``boft-plugin sft --help`` lists every key.
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
    """Write an adapter directory (ours or stock PEFT's) in another, exactly equivalent form."""
    from .export.single_factor import SingleFactorError, convert_to_single_factor
    from .ops.single_factor import DEFAULT_ATOL, DEFAULT_MIN_DIST

    parser = argparse.ArgumentParser(prog="boft-plugin convert", description=_convert.__doc__)
    parser.add_argument(
        "--single-factor",
        action="store_true",
        required=True,
        help="write the m = 1 adapter with block size b * 2**(m-1) that stock PEFT loads without its CUDA extension",
    )
    parser.add_argument("source", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("target", help="new directory for the converted adapter")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max float32 round-trip error per block")
    parser.add_argument("--min-dist", type=float, default=DEFAULT_MIN_DIST, help="min |1 + eigenvalue| per block")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty target directory")
    args = parser.parse_args(argv)
    try:
        summary = convert_to_single_factor(
            args.source, args.target, atol=args.atol, min_dist=args.min_dist, overwrite=args.overwrite
        )
    except (SingleFactorError, OSError) as err:
        print(f"boft-plugin convert: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"target": args.target, **summary}), flush=True)
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
    if command in ("sft", "dpo"):
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
