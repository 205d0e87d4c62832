"""`mnnpipe`: the command line and the step container's entrypoint.

Exit codes: 0 success; 2 invalid spec or input (one line naming the field or file); 1 a step or
tool failure; 3 the artifact store could not be reached or written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import MnnpipeError, SpecError
from .spectext import SPEC_MAX_BYTES, SPEC_MAX_DEPTH, SPEC_MAX_NODES, load_yaml, parse_spec_text  # noqa: F401  (the CLI's API too)
from .store import redact
from . import catalog


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON spec ('-' for stdin) into a dict."""
    try:
        # Read one character past the limit, never the whole of a huge file (or /dev/zero).
        if path == "-":
            text = sys.stdin.read(SPEC_MAX_BYTES + 1)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(SPEC_MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"--spec: file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"--spec: file '{path}' cannot be read ({type(e).__name__})") from None
    return parse_spec_text(text, f"--spec {path}")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML: numbers, booleans, lists) to nested dicts/lists."""
    if "=" not in assignment:
        raise SpecError(f"--set '{assignment}': expected key.path=value")
    path, _, raw = assignment.partition("=")
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise SpecError(f"--set '{assignment}': empty key in '{path}'")
    try:
        value = load_yaml(raw, f"--set '{path}'") if raw.strip() else raw
    except SpecError as e:
        if "not valid YAML" not in str(e):
            raise  # over a limit: refused, not taken as a plain string
        value = raw
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SpecError(f"--set '{assignment}': '{key}' is not an index of a {len(node)}-item list")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise SpecError(f"--set '{assignment}': '{'.'.join(keys[:i])}' is not a mapping")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": redact(record.getMessage()),
            }
        )


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(fmt: str, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mnnpipe")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnnpipe", description="Compress PyTorch models for MNN, one typed step at a time.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Only warnings and errors; no progress bars.")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="Log lines as text or JSON.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for unexpected errors.")
    parser.add_argument("--version", action="version", version=f"mnnpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    steps = catalog.names()

    run = sub.add_parser("run", help="Run one step from a spec file.")
    run.add_argument("step", choices=steps)
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="YAML or JSON spec file ('-' for stdin).")
    src.add_argument("--spec-json", help="The spec as a JSON string (how KFP passes it).")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a spec field, e.g. --set tolerance.min_cosine=0.99")
    run.add_argument("--result", help="Also write the result JSON to this local file.")
    run.add_argument("--no-cache", action="store_true", help="Run even when an identical earlier run's output exists.")
    run.add_argument(
        "--keep-failed",
        nargs="?",
        const="mnnpipe-failed",
        metavar="DIR",
        help="Keep a model that fails verification, marked FAILED, in a new folder under DIR (default ./mnnpipe-failed), "
        "never under the spec's output; the error names the folder.",
    )

    val = sub.add_parser("validate", help="Validate a spec without running it.")
    val.add_argument("step", choices=steps)
    val.add_argument("--spec", required=True)
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    schema = sub.add_parser("schema", help="Print a step's JSON Schema.")
    schema.add_argument("step", choices=steps)

    sub.add_parser("steps", help="List the steps this installation provides.")

    from .kfp.launcher import add_arguments as add_kfp_launch_arguments

    kfp_launch = sub.add_parser("kfp-launch", help="Run a step inside a Kubeflow Pipelines container component.")
    add_kfp_launch_arguments(kfp_launch)

    demo = sub.add_parser("demo", help="Run the whole compression pipeline on the bundled digits data.")
    demo.add_argument("--workdir", default="mnnpipe-demo", help="Local artifact folder (default ./mnnpipe-demo).")
    demo.add_argument("--no-cache", action="store_true")
    demo.add_argument("--search", action="store_true", help="Then search 6 recipes (prune ratio x quantize mode) and release the best.")

    search = sub.add_parser("search", help="Run every candidate recipe of a search spec, choose the best within its constraints, release it.")
    search.add_argument("--spec", required=True, help="YAML or JSON search spec ('-' for stdin): base recipe, space, constraints, objective.")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a search spec field.")
    search.add_argument("--model-uri", required=True, help="The source model (path, file:// or s3://).")
    search.add_argument("--output", required=True, help="Where candidates publish: <output>/candidates/<id>/<step>, <output>/select.")
    search.add_argument("--release-root", help="Release the chosen model under <release-root>/<name>/<version>/<search digest>/.")
    search.add_argument("--name", default="model", help="Model name in the release (default: model).")
    search.add_argument("--version", dest="model_version", default="1", help="Model version in the release (default: 1).")
    search.add_argument("--workers", type=int, default=1, help="Candidates run at once in a process pool (default 1: one after another).")
    search.add_argument("--no-cache", action="store_true")
    return parser


def _spec_data(args: argparse.Namespace) -> dict[str, Any]:
    data = parse_spec_text(args.spec_json, "--spec-json") if getattr(args, "spec_json", None) else load_spec_file(args.spec)
    for assignment in args.set:
        apply_override(data, assignment)
    return data


def one_line(text: str) -> str:
    """Errors are one line, even when a file name or a tool's message holds newlines."""
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, args.quiet)
    try:
        return _dispatch(args)
    except MnnpipeError as e:
        print(f"error: {one_line(redact(str(e)))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so in one line
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"error: internal failure ({type(e).__name__}: {one_line(redact(first))}); rerun with --debug for a traceback", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from .runner import parse_spec, run_step

    if args.command == "schema":
        print(json.dumps(catalog.get(args.step).spec.model_json_schema(), indent=2))
        return 0
    if args.command == "steps":
        print("\n".join(catalog.names()))
        return 0
    if args.command == "validate":
        spec = parse_spec(args.step, _spec_data(args))
        print(spec.model_dump_json(indent=2))
        return 0
    if args.command == "kfp-launch":
        from .kfp.launcher import run_from_args

        return run_from_args(args)
    if args.command == "demo":
        from .demo import run_demo, run_demo_search

        run_demo(Path(args.workdir), use_cache=not args.no_cache, quiet=args.quiet)
        if args.search:
            run_demo_search(Path(args.workdir), use_cache=not args.no_cache, quiet=args.quiet)
        return 0
    if args.command == "search":
        from .demo import print_search
        from .searching import run_search

        if args.workers < 1:
            raise SpecError(f"--workers: expected a positive number, got {args.workers}")
        search = run_search(
            _spec_data(args), model_uri=args.model_uri, output=args.output, release_root=args.release_root, name=args.name,
            version=args.model_version, workers=args.workers, use_cache=not args.no_cache, quiet=args.quiet,
        )  # fmt: skip
        print_search(search, print)
        return 0
    spec = parse_spec(args.step, _spec_data(args))
    if args.keep_failed:
        from .failures import ENV

        keep = Path(args.keep_failed).absolute()
        output = spec.output[len("file://") :] if spec.output.startswith("file://") else spec.output
        if "://" not in output and (keep == Path(output).absolute() or Path(output).absolute() in keep.parents):
            raise SpecError(f"--keep-failed: '{args.keep_failed}' is inside the spec's output; a failed model must never sit where it would be published")
        os.environ[ENV] = str(keep)
    result = run_step(args.step, spec, use_cache=not args.no_cache, quiet=args.quiet)
    text = result.model_dump_json(indent=2)
    if args.result:
        out = Path(args.result)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
