"""The ``curvdist`` command line: ``curvdist run CONFIG [--set key=value ...] [--output PATH]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import CurvdistError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvdist", description="Curvature of neural-network loss landscapes.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the queries of a YAML config and write a JSON report")
    run.add_argument("config", help="path to a YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted path, list items by index), value parsed as YAML")
    run.add_argument("--output", "-o", default=None, help="JSON output path (default: config 'output' or "
                     "results/<config name>.json)")
    run.add_argument("--quiet", "-q", action="store_true", help="no table, no progress bars")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint "
                     "(<output>.ckpt/): finished queries are reused, an interrupted eigensolve restarts from its "
                     "last saved Lanczos state")
    tr = sub.add_parser("train", help="train with the config's train section, logging its queries (e.g. invariant "
                        "flatness) every train.log_every steps")
    tr.add_argument("config", help="path to a YAML config with a 'train' section")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted path), value parsed as YAML")
    tr.add_argument("--output", "-o", default=None, help="JSON output path")
    tr.add_argument("--quiet", "-q", action="store_true", help="no log lines")
    from .cluster_commands import add_subcommands

    add_subcommands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..runtime import remove_import_paths, user_import_paths

    # the user's factory modules in the working dir or next to the config; taken off again when main returns
    added = user_import_paths(args.config) if args.command in ("run", "train") else []
    try:
        from .cluster_commands import dispatch
        rc = dispatch(args)
        if rc is not None:
            return rc
        if args.command == "train":
            from .config import load_config
            from .train import train_and_log

            cfg = load_config(args.config, args.overrides)
            doc = train_and_log(cfg, args.config, args.output, progress=not args.quiet)
            if not args.quiet:
                print(f"wrote {doc['output']}" + "".join(f", {p}" for p in doc.get("plots", [])))
            return 0
        if args.command == "run":
            from .config import load_config
            from .runner import run
            from .table import render, render_invariance

            cfg = load_config(args.config, args.overrides)
            doc = run(cfg, args.config, args.output, progress=not args.quiet, resume=args.resume)
            if not args.quiet:
                if doc.get("train"):
                    t = doc["train"]
                    print(f"trained {t['steps']} {t['optimizer']} steps: loss {t['final_loss']:.4g} "
                          f"({t['seconds']:.1f} s)")
                pr = doc["problem"]
                print(f"problem: {pr['dim']} parameters, {pr['samples']} samples, loss {pr['loss_value']:.6g}")
                print(render(doc["results"]))
                if "invariance" in doc:
                    r = doc["config"]["reparam"]
                    print(f"\ninvariance under the {r['kind']} reparametrization (θ = φ(ψ)), each side computed in "
                          "its own coordinates:")
                    print(render_invariance(doc["invariance"]))
                print(f"wrote {doc['output']}" + "".join(f", {p}" for p in doc.get("plots", [])))
        return 0
    except CurvdistError as e:
        print(f"curvdist: error: {e}", file=sys.stderr)
        return 2
    finally:
        remove_import_paths(added)


if __name__ == "__main__":
    sys.exit(main())
