"""Checks `vllm serve` argument lists with the installed vLLM's own parser (CI: tests/deploy).

    python deploy/ci/check_vllm_args.py LISTS.json      # {"name": ["MODEL", "--flag", "value", ...]}
    python deploy/ci/check_vllm_args.py - < LISTS.json
    python deploy/ci/check_vllm_args.py --argparse-only LISTS.json   # skip the exact-spelling check
    python deploy/ci/check_vllm_args.py --engine-config DIR LISTS.json  # and build the engine config

Builds the `serve` subcommand parser exactly as the `vllm` command does (vllm.entrypoints.cli.serve
ServeSubcommand.subparser_init -> make_arg_parser), parses ["serve", *list] and runs
validate_parsed_serve_args. On top of that every `--option` must be spelled as vLLM defines it:
argparse would otherwise accept an abbreviation, so a flag renamed to a longer name could slip
through. With --engine-config DIR, each list that parses is also turned into vLLM's engine
config with the list's model replaced by DIR (e.g. the builder's --published-config directory,
weights replaced by --load-format dummy): vLLM's config validation and the Kimi Linear plugin's
start-up checks (its config hook) run on the list's exact flags, as `vllm serve` would before
starting any worker. Prints {"name": {"ok": bool, "error": str}} as JSON; exits 1 if any list fails.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys


def build_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    serve = ServeSubcommand().subparser_init(subparsers)
    return parser, serve


def check(parser, serve, args: list[str], exact_names: bool = True) -> str | None:
    """None if vLLM accepts `vllm serve ARGS`, else the error text."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    if not all(isinstance(a, str) for a in args):
        return f"every argument must be a string (YAML numbers need quotes): {args!r}"
    known = set(serve._option_string_actions)
    for a in args if exact_names else ():
        if a.startswith("--") and len(a) > 2:
            name = a.split("=", 1)[0].split(".", 1)[0]  # --flag=value, --json-arg.key value
            name = "--" + name[2:].replace("_", "-")
            if name not in known and name.replace("-", "_") not in known:
                return f"unknown option {a!r} (not an option of vllm serve)"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(["serve", *args])
            validate_parsed_serve_args(ns)
    except SystemExit as e:
        return err.getvalue().strip() or f"argparse exited with {e.code}"
    except Exception as e:  # validate_parsed_serve_args raises TypeError / ValueError
        return f"{type(e).__name__}: {e}"
    return None


def engine_config_error(parser, args: list[str], model_dir: str) -> str | None:
    """None if vLLM builds the engine config of `vllm serve ARGS` with the model replaced by
    `model_dir` (dummy weights), else the error text."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    ns = parser.parse_args(["serve", model_dir, *args[1:]])
    ns.model, ns.load_format = model_dir, "dummy"
    try:
        AsyncEngineArgs.from_cli_args(ns).create_engine_config(UsageContext.OPENAI_API_SERVER)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str]) -> int:
    exact = "--argparse-only" not in argv
    argv = [a for a in argv if a != "--argparse-only"]
    model_dir = None
    if "--engine-config" in argv:
        i = argv.index("--engine-config")
        model_dir = argv[i + 1]
        del argv[i:i + 2]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 64
    lists = json.load(sys.stdin if argv[0] == "-" else open(argv[0]))
    parser, serve = build_parser()
    report = {}
    for name, args in lists.items():
        error = check(parser, serve, args, exact)
        if error is None and model_dir is not None:
            error = engine_config_error(parser, args, model_dir)
        report[name] = {"ok": error is None, "error": error or ""}
    print(json.dumps(report))  # one line, the last: vLLM may log to stdout before it
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
