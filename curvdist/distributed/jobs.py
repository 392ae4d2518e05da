"""Sending ``curvdist run`` to an existing Ray cluster through the Ray Jobs API.

The Jobs API is Ray's own: a ``JobSubmissionClient`` talks HTTP to the dashboard of the head node (default port
8265; it needs ``ray[default]``), uploads the working directory as a package and starts the job's entrypoint — a
shell command — on the cluster. curvdist adds nothing of its own on the wire; this module only

- builds the entrypoint ``<python> -m curvdist run <config relative to the working dir> [--output P] [--set ...]``
  and a runtime environment that carries the working directory (without ``.venv``, ``.git``, ``results``,
  ``__pycache__``, ...), ``RAY_AUTH_MODE``, and ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` so that the driver's own
  ``ray.init(runtime_env=...)`` may repeat those variables (a config with ``backend: {kind: ray, address: auto}``
  then runs its actors on the job's cluster);
- checks locally what can be checked before anything is sent (the config exists, lies inside the working
  directory, and validates);
- fails fast and in one line when the address is unreachable (a bounded HTTP probe before Ray's client, whose
  own requests have no timeout), the job id is unknown, or the cluster demands a token;
- follows a job's logs and waits for its end.

Assumptions, stated once: the uploaded working directory holds the config, not curvdist itself, so every node
must have curvdist installed for the interpreter the entrypoint names (``python`` on the cluster's ``PATH`` by
default, as in the image of ``docker/``; ``--python`` picks another). Paths in the config and ``--output`` are
seen from the job's copy of the working directory on the node that runs it; use absolute paths on shared
storage to keep results.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .cluster import ClusterError

#: Dashboard port a bare ``HOST`` address gets (``http://HOST:8265``).
DEFAULT_DASHBOARD_PORT = 8265
#: Seconds the reachability probe may take before the address counts as unreachable.
CONNECT_TIMEOUT = 5.0
#: gitignore-style patterns never uploaded with the working directory (Ray also honours ``.gitignore`` files).
DEFAULT_EXCLUDES: tuple[str, ...] = (".venv", ".git", "results", "__pycache__", ".pytest_cache", "*.egg-info")
#: Job states after which nothing changes any more.
TERMINAL_STATES: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED")


def auth_mode() -> str:
    """The ``RAY_AUTH_MODE`` this process and the jobs it submits use: the caller's value, else ``disabled``.

    It is written into this process's environment before Ray is imported: without an explicit mode, a token left
    under ``~/.ray`` by an earlier ``ray.init()`` switches Ray's client to token mode and requests to a cluster
    started without one fail. Set ``RAY_AUTH_MODE=token`` (with the cluster's token in ``RAY_AUTH_TOKEN`` or
    ``~/.ray/auth_token``) for clusters that use token authentication.
    """
    return os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def normalize_address(address: str | None) -> str:
    """``http(s)://host:port`` of a Ray dashboard, without a trailing slash.

    A bare ``host`` or ``host:port`` gets ``http://`` (and port 8265 when none is given). Ray client (``ray://``)
    and GCS addresses are refused: the Jobs API lives on the dashboard's HTTP port.
    """
    if not address or not address.strip():
        raise ClusterError("no Ray dashboard address: pass --address http://HEAD:8265 "
                           "(or set RAY_API_SERVER_ADDRESS)")
    text = address.strip().rstrip("/")
    if "://" not in text:
        text = f"http://{text}"
        if urlsplit(text).port is None:
            text = f"{text}:{DEFAULT_DASHBOARD_PORT}"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        raise ClusterError(f"malformed Ray dashboard address {address!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(f"the Ray Jobs API needs the dashboard's http(s) address, e.g. http://HEAD:8265; "
                           f"got {address!r}")
    return text


def _reason(e: BaseException) -> str:
    """The useful part of a connection error (requests nests it several levels deep)."""
    import requests

    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return "no answer"
    return text.splitlines()[0] if text else type(e).__name__


def probe(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise :class:`ClusterError` unless a Ray dashboard answers at ``address`` within ``timeout`` seconds."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", timeout=(timeout, timeout))
    except requests.exceptions.RequestException as e:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {_reason(e)}") from None
    if r.status_code == 404:
        raise ClusterError(f"{address} answers but serves no Ray Jobs API (is it the dashboard port of a Ray "
                           "head started with the dashboard and ray[default]?)")


@dataclass(frozen=True)
class Submission:
    """What :meth:`JobClient.submit` sends: the entrypoint shell command and the runtime environment."""

    config: Path
    working_dir: Path
    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


def prepare_submission(config: str | Path, *, working_dir: str | Path | None = None,
                       overrides: Sequence[str] = (), output: str | None = None, python: str = "python",
                       excludes: Sequence[str] = DEFAULT_EXCLUDES, num_cpus: float | None = None,
                       num_gpus: float | None = None, address: str = "the cluster",
                       validate: Callable[[Path, list[str]], Any] | None = None) -> Submission:
    """Check the config locally and build the job; nothing is sent.

    The config must lie inside ``working_dir`` (default: the current directory), the folder the job receives;
    it is not copied anywhere. ``validate(path, overrides)``, when given, checks it with the overrides applied (the
    CLI passes its YAML loader), so a typo fails here, not on the cluster. ``output`` is passed on unchanged (seen
    from the job's working directory on the node that runs it). ``address`` only serves the error messages.
    """
    wd = Path(working_dir if working_dir is not None else os.getcwd()).resolve()
    if not wd.is_dir():
        raise ClusterError(f"working directory not found: {wd} (nothing was submitted to {address})")
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise ClusterError(f"config file not found: {config} (nothing was submitted to {address})")
    try:
        rel = PurePosixPath(path.relative_to(wd).as_posix())
    except ValueError:
        raise ClusterError(f"config {path} lies outside the working directory {wd}, the folder the job receives "
                           f"(nothing was submitted to {address}); move it inside or pass --working-dir") from None
    excluded = [p for p in excludes if any(PurePosixPath(part).match(p) for part in rel.parts)]
    if excluded:
        raise ClusterError(f"config {path} lies in a folder excluded from the upload ({excluded[0]!r}); "
                           f"nothing was submitted to {address}")
    if validate is not None:
        validate(path, list(overrides))  # ConfigError (one line, names the key) before anything is sent

    args = [python, "-m", "curvdist", "run", str(rel)]
    if output:
        args += ["--output", output]
    for item in overrides:
        args += ["--set", item]
    # RAY_OVERRIDE_JOB_RUNTIME_ENV: the driver's own ray.init(runtime_env=...) (curvdist's ray_session forwards
    # RAY_AUTH_MODE to its workers) may name the same variables; without it Ray refuses to merge the two.
    runtime_env = {"working_dir": str(wd), "excludes": list(excludes),
                   "env_vars": {"RAY_AUTH_MODE": auth_mode(), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}}
    return Submission(config=path, working_dir=wd, entrypoint=shlex.join(args), runtime_env=runtime_env,
                      entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus)


class JobClient:
    """A ``ray.job_submission.JobSubmissionClient`` whose failures are one-line :class:`ClusterError` s naming the
    address (unreachable, unknown job id, authentication) and whose log stream is a plain iterator."""

    def __init__(self, address: str | None, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.address = normalize_address(address)
        auth_mode()
        probe(self.address, connect_timeout)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:  # pragma: no cover - ray is a dependency
            raise ClusterError(f"the Ray Jobs API needs ray[default] ({e})") from None
        with self._errors("connecting"):
            self._client = JobSubmissionClient(self.address)

    def _errors(self, what: str, job_id: str | None = None) -> _Translate:
        return _Translate(self.address, what, job_id)

    def submit(self, sub: Submission, metadata: dict[str, str] | None = None) -> str:
        """Upload the working directory, start the entrypoint; returns the submission id (``raysubmit_...``)."""
        with self._errors("submitting a job"):
            return self._client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                           metadata=metadata, entrypoint_num_cpus=sub.entrypoint_num_cpus,
                                           entrypoint_num_gpus=sub.entrypoint_num_gpus)

    def info(self, job_id: str) -> Any:
        """Ray's ``JobDetails`` of a job (status, message, start/end times, entrypoint, ...)."""
        with self._errors("asking for the job", job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        state = self.info(job_id).status
        return str(getattr(state, "value", state))

    def logs(self, job_id: str) -> str:
        """The job's output so far (stdout and stderr of the entrypoint)."""
        with self._errors("fetching the logs", job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's output in chunks as it is written, from the beginning, until the job ends."""
        self.info(job_id)  # an unknown id fails here, in one line, instead of in the websocket handshake
        loop = asyncio.new_event_loop()
        stream: Any = self._client.tail_job_logs(job_id)  # an async generator
        try:
            while True:
                with self._errors("following the logs", job_id):
                    try:
                        chunk = loop.run_until_complete(stream.__anext__())
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            try:
                loop.run_until_complete(stream.aclose())
            finally:
                loop.close()

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> str:
        """Poll until the job reaches a terminal state and return it; ClusterError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status(job_id)
            if state in TERMINAL_STATES:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} on {self.address} still {state} after {timeout:g} s")
            time.sleep(poll)


class _Translate:
    """Context manager turning the Jobs client's exceptions into one-line ClusterErrors."""

    def __init__(self, address: str, what: str, job_id: str | None) -> None:
        self.address, self.what, self.job_id = address, what, job_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if e is None or not isinstance(e, Exception) or isinstance(e, ClusterError):
            return  # nothing to translate; the exception, if any, propagates unchanged
        import requests

        text = str(e)
        if self.job_id is not None and ("status code 404" in text or "does not exist" in text):
            raise ClusterError(f"no job {self.job_id!r} on the Ray cluster at {self.address}") from None
        if type(e).__name__ == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
            raise ClusterError(f"the Ray cluster at {self.address} rejected the request ({text.splitlines()[0]}); "
                               f"RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE')!r} here — it must match the "
                               "cluster's, with its token in RAY_AUTH_TOKEN for token mode") from None
        if isinstance(e, (ConnectionError, requests.exceptions.RequestException)):
            raise ClusterError(f"lost the Ray dashboard at {self.address} while {self.what}: {_reason(e)}") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise ClusterError(f"{self.what} at {self.address} failed: {first}") from None
