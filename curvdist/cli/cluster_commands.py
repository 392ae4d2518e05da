"""``curvdist submit | status | logs``: running configs on a Ray cluster through the Ray Jobs API.

::

    curvdist submit CONFIG --address http://HEAD:8265 [--set KEY=VALUE ...] [--output PATH] [--wait]
    curvdist status JOB_ID --address http://HEAD:8265
    curvdist logs JOB_ID --address http://HEAD:8265 [--follow]

``--address`` defaults to ``$RAY_API_SERVER_ADDRESS`` (the variable Ray's own ``ray job`` CLI reads). ``submit``
prints the job id alone on the first line of stdout; with ``--wait`` the job's output follows and the exit code is
0 if the job succeeded, 1 if it failed or was stopped. Errors (unreachable address, unknown job id, missing or
invalid config) are one line on stderr with exit code 2, raised as :class:`~curvdist.errors.CurvdistError` and
reported by :func:`curvdist.cli.main.main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get(ADDRESS_ENV),
                   help=f"the Ray dashboard, e.g. http://HEAD:8265 (default: ${ADDRESS_ENV})")


def add_subcommands(subparsers: Any) -> None:
    """Add ``submit``, ``status`` and ``logs`` to the ``curvdist`` parser's subparsers."""
    from ..distributed.jobs import DEFAULT_EXCLUDES

    s = subparsers.add_parser("submit", help="run a config on a Ray cluster as a Ray job; prints the job id",
                              description="Submit `curvdist run CONFIG` to a Ray cluster through the Ray Jobs API. "
                              "The working directory (which must contain CONFIG) is uploaded with the job; "
                              "curvdist itself must be installed on the cluster's nodes.")
    s.add_argument("config", help="YAML config inside the working directory")
    _address(s)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for `curvdist run` (validated here before submitting)")
    s.add_argument("--output", "-o", default=None,
                   help="JSON output path on the node that runs the job (relative paths are inside the job's "
                   "copy of the working directory; use shared storage to keep it)")
    s.add_argument("--working-dir", default=None,
                   help="folder uploaded as the job's working directory (default: the current directory)")
    s.add_argument("--exclude", dest="excludes", action="append", default=[], metavar="PATTERN",
                   help=f"gitignore-style pattern left out of the upload, in addition to {list(DEFAULT_EXCLUDES)}")
    s.add_argument("--python", default="python",
                   help="interpreter on the cluster that has curvdist installed (default: python on its PATH)")
    s.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs reserved for the job's driver, where `curvdist run` computes (Ray default: 0)")
    s.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs reserved for the job's driver; places it on a node with GPUs (Ray default: 0)")
    s.add_argument("--wait", action="store_true",
                   help="follow the job's output until it ends; exit 1 if it did not succeed")

    st = subparsers.add_parser("status", help="print a Ray job's status (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED)")
    st.add_argument("job_id", help="the id `curvdist submit` printed")
    _address(st)

    lg = subparsers.add_parser("logs", help="print a Ray job's output")
    lg.add_argument("job_id", help="the id `curvdist submit` printed")
    _address(lg)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def _print_stream(chunks: Any) -> None:
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _submit(args: argparse.Namespace) -> int:
    from ..distributed.jobs import DEFAULT_EXCLUDES, JobClient, normalize_address, prepare_submission

    address = normalize_address(args.address)
    from .config import load_config

    sub = prepare_submission(args.config, working_dir=args.working_dir, overrides=args.overrides,
                             validate=load_config,
                             output=args.output, python=args.python,
                             excludes=[*DEFAULT_EXCLUDES, *args.excludes], num_cpus=args.num_cpus,
                             num_gpus=args.num_gpus, address=address)
    client = JobClient(address)
    job_id = client.submit(sub, metadata={"curvdist_config": sub.config.relative_to(sub.working_dir).as_posix()})
    print(job_id, flush=True)
    if not args.wait:
        return 0
    try:
        _print_stream(client.follow(job_id))
        state = client.wait(job_id)
    except KeyboardInterrupt:
        print(f"curvdist: stopped following; job {job_id} keeps running on {address}", file=sys.stderr)
        return 130
    print(f"job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def _status(args: argparse.Namespace) -> int:
    from ..distributed.jobs import JobClient

    info = JobClient(args.address).info(args.job_id)
    state = str(getattr(info.status, "value", info.status))
    print(state)
    if state in ("FAILED", "STOPPED") and info.message:
        print(info.message.strip(), file=sys.stderr)
    return 0


def _logs(args: argparse.Namespace) -> int:
    from ..distributed.jobs import JobClient

    client = JobClient(args.address)
    if not args.follow:
        sys.stdout.write(client.logs(args.job_id))
        sys.stdout.flush()
        return 0
    try:
        _print_stream(client.follow(args.job_id))
    except KeyboardInterrupt:
        return 130
    return 0


def dispatch(args: argparse.Namespace) -> int | None:
    """Run ``args.command`` if it is ``submit``, ``status`` or ``logs`` and return its exit code; None otherwise."""
    handlers = {"submit": _submit, "status": _status, "logs": _logs}
    handler = handlers.get(str(getattr(args, "command", "")))
    return None if handler is None else handler(args)
