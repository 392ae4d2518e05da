"""`curvdist submit | status | logs` against a real Ray head started here, their one-line errors, and the
cluster launchers (KubeRay manifest, SLURM script, Dockerfile).

The head is stopped by signalling the process group of its own `ray start --block`: `ray stop` would kill every
Ray process on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

import curvdist as cd
from curvdist import zoo
from curvdist.cli.main import main
from curvdist.distributed.cluster import ClusterError
from curvdist.distributed.jobs import normalize_address, prepare_submission

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
AUTH_MODE = "disabled"
MODEL_KWARGS = {"in_features": 64, "hidden": [4], "out_features": 10}
DATA_KWARGS = {"n": 100, "dtype": "float64"}
JOB_ID = re.compile(r"^raysubmit_\w+$")
OBJECT_STORE = "--object-store-memory=100000000"  # 100 MB: two small clusters on a shared machine

# Ray's own log-tailing client passes ssl=None to aiohttp
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(output: str = "out.json") -> dict:
    return {
        "seed": 0,
        "dtype": "float64",
        "model": {"factory": "curvdist.zoo:mlp", "kwargs": MODEL_KWARGS},
        "data": {"factory": "curvdist.zoo:digits", "kwargs": DATA_KWARGS},
        "loss": "cross_entropy",
        "queries": [{"kind": "eigs", "k": 2}],
        "output": output,
    }


def _workdir(tmp_path: Path) -> Path:
    """A job working directory with the config, plus clutter that must not be uploaded."""
    wd = tmp_path / "wd"
    (wd / ".venv").mkdir(parents=True)
    (wd / ".venv" / "big.bin").write_bytes(b"\0" * 1024)
    (wd / "results").mkdir()
    (wd / "results" / "old.json").write_text("{}")
    (wd / "job.yaml").write_text(yaml.safe_dump(_config()))
    return wd


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict]:
    """A Ray head node on free ports with its dashboard on 127.0.0.1, in its own temp dir and process group."""
    if not RAY.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    temp_dir = tempfile.mkdtemp(prefix="cdray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    dashboard = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE=AUTH_MODE, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY), "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={_free_port()}",
           f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", OBJECT_STORE]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the Ray head did not start:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"address": address, "temp_dir": temp_dir}
    finally:
        # SIGTERM to `ray start --block` alone lets it shut its node down (a few seconds); SIGKILL what is left
        # of its process group after that.
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for _ in range(20):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _auth_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process here agrees on RAY_AUTH_MODE; the variable is restored afterwards."""
    monkeypatch.setenv("RAY_AUTH_MODE", AUTH_MODE)


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_submit_runs_the_config_on_the_cluster(ray_head, tmp_path, capsys, monkeypatch):
    address = ray_head["address"]
    monkeypatch.chdir(_workdir(tmp_path))
    out_json = tmp_path / "out.json"  # absolute: the job runs in Ray's copy of wd, on this machine
    # the job's interpreter is this one, which has curvdist installed (the head runs from the same environment)
    rc, out, err = _cli(capsys, "submit", "job.yaml", "--address", address, "--python", sys.executable,
                        "--output", str(out_json))
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and JOB_ID.match(lines[0]), out  # machine-readable: the id alone
    job_id = lines[0]

    deadline = time.monotonic() + 240
    while True:
        rc, out, err = _cli(capsys, "status", job_id, "--address", address)
        assert rc == 0, err
        state = out.strip()
        assert state in ("PENDING", "RUNNING", "SUCCEEDED"), (state, err)
        if state == "SUCCEEDED":
            break
        assert time.monotonic() < deadline, "the job did not finish within 240 s"
        time.sleep(1.0)

    rc, logs, err = _cli(capsys, "logs", job_id, "--address", address)
    assert rc == 0, err
    assert f"-m curvdist run job.yaml --output {out_json}" in logs  # Ray echoes the entrypoint
    assert "problem: 310 parameters, 100 samples" in logs
    assert re.search(r"^eigs\s+hessian\s+euclidean\s+theta\s+\[", logs, re.M), logs  # the result table
    assert f"wrote {out_json}" in logs

    # The job computed what a local computation of the same problem gives.
    doc = json.loads(out_json.read_text())
    (res,) = doc["results"]
    problem = cd.Problem(zoo.mlp(**MODEL_KWARGS, dtype="float64"), "cross_entropy", zoo.digits(**DATA_KWARGS))
    local = cd.eigs(cd.operator(problem, "hessian"), k=2)
    np.testing.assert_allclose(res["value"], local.value, rtol=1e-10, atol=0)

    # The upload held the config and not the excluded folders.
    copies = list(Path(ray_head["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*/job.yaml"))
    assert copies, "no working_dir copy found under the Ray temp dir"
    for c in copies:
        assert not (c.parent / ".venv").exists() and not (c.parent / "results").exists()


@pytest.mark.slow
def test_submitted_job_runs_the_ray_backend_on_the_cluster(ray_head, tmp_path, capsys, monkeypatch):
    """A data-mode config: the job's driver joins the cluster it runs on (backend.address=auto) and its actors
    compute there; the same eigenvalues as the local problem."""
    address = ray_head["address"]
    wd = _workdir(tmp_path)
    monkeypatch.chdir(wd)
    out_json = tmp_path / "ray.json"
    rc, out, err = _cli(capsys, "submit", "job.yaml", "--address", address, "--python", sys.executable,
                        "--output", str(out_json), "--set", "backend={kind: ray, mode: data, workers: 2}",
                        "--set", "backend.address=auto", "--wait")
    assert rc == 0, out + err
    problem = cd.Problem(zoo.mlp(**MODEL_KWARGS, dtype="float64"), "cross_entropy", zoo.digits(**DATA_KWARGS))
    local = cd.eigs(cd.operator(problem, "hessian"), k=2)
    np.testing.assert_allclose(json.loads(out_json.read_text())["results"][0]["value"], local.value, rtol=1e-10)


def test_wait_follows_a_failing_job_and_exits_nonzero(ray_head, tmp_path, capsys, monkeypatch):
    address = ray_head["address"]
    wd = _workdir(tmp_path)
    monkeypatch.chdir(wd)
    # an interpreter that fails at once: the job ends FAILED without importing anything
    rc, out, err = _cli(capsys, "submit", "job.yaml", "--address", address, "--python", "false", "--wait")
    assert rc == 1, err
    job_id = out.splitlines()[0]
    assert JOB_ID.match(job_id)
    assert "false -m curvdist run job.yaml" in out  # the followed logs
    assert f"job {job_id} FAILED" in err

    rc, out, err = _cli(capsys, "status", job_id, "--address", address)
    assert (rc, out.strip()) == (0, "FAILED")
    assert err.strip()  # Ray's reason, on stderr


@pytest.mark.parametrize("command", ["status", "logs"])
def test_unknown_job_id_is_a_one_line_error(ray_head, capsys, command):
    address = ray_head["address"]
    rc, out, err = _cli(capsys, command, "raysubmit_doesnotexist", "--address", address)
    assert rc == 2 and out == ""
    assert err.startswith("curvdist: error: ") and len(err.strip().splitlines()) == 1
    assert "raysubmit_doesnotexist" in err and address in err


@pytest.mark.parametrize("argv", [["status", "raysubmit_x"], ["logs", "raysubmit_x", "--follow"],
                                  ["submit", "job.yaml"]])
def test_unreachable_address_fails_fast(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(_workdir(tmp_path))
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    rc, out, err = _cli(capsys, *argv, "--address", address)
    assert time.perf_counter() - t0 < 10
    assert rc == 2 and out == ""
    assert err.startswith("curvdist: error: cannot reach the Ray dashboard at") and address in err


def test_local_errors_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    wd = _workdir(tmp_path)
    monkeypatch.chdir(wd)
    address = f"http://127.0.0.1:{_free_port()}"  # unreachable: these must fail before trying it
    rc, _, err = _cli(capsys, "submit", "missing.yaml", "--address", address)
    assert rc == 2 and "config file not found: missing.yaml" in err and address in err

    outside = tmp_path / "outside.yaml"
    outside.write_text(yaml.safe_dump(_config()))
    rc, _, err = _cli(capsys, "submit", str(outside), "--address", address)
    assert rc == 2 and "outside the working directory" in err and str(outside) in err

    rc, _, err = _cli(capsys, "submit", "job.yaml", "--address", address, "--set", "quries=[]")
    assert rc == 2 and "unknown key 'quries'" in err

    rc, _, err = _cli(capsys, "submit", "results/old.json", "--address", address)
    assert rc == 2 and "excluded from the upload" in err

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    rc, _, err = _cli(capsys, "status", "raysubmit_x")
    assert rc == 2 and "--address" in err


def test_entrypoint_and_runtime_env(tmp_path, monkeypatch):
    wd = _workdir(tmp_path)
    (wd / "configs").mkdir()
    (wd / "configs" / "a b.yaml").write_text(yaml.safe_dump(_config()))
    monkeypatch.chdir(wd)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    sub = prepare_submission("configs/a b.yaml", overrides=["seed=3", "queries.0.k=1"], output="/shared/o.json",
                             python="/opt/venv/bin/python", num_gpus=1)
    assert sub.entrypoint == ("/opt/venv/bin/python -m curvdist run 'configs/a b.yaml' --output /shared/o.json "
                              "--set seed=3 --set queries.0.k=1")
    env = sub.runtime_env
    assert env["working_dir"] == str(wd.resolve())
    assert {".venv", ".git", "results", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_AUTH_MODE"] == "disabled" and os.environ["RAY_AUTH_MODE"] == "disabled"
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # the driver's ray.init may name RAY_AUTH_MODE
    assert sub.entrypoint_num_gpus == 1 and sub.entrypoint_num_cpus is None


@pytest.mark.parametrize("given, expected", [
    ("head", "http://head:8265"), ("10.0.0.5:9000", "http://10.0.0.5:9000"),
    ("http://127.0.0.1:8265/", "http://127.0.0.1:8265"), ("https://ray.example.com", "https://ray.example.com"),
])
def test_normalize_address(given, expected):
    assert normalize_address(given) == expected


@pytest.mark.parametrize("bad", ["ray://head:10001", "", "http://:80", "http://head:notaport"])
def test_normalize_address_rejects(bad):
    with pytest.raises(ClusterError):
        normalize_address(bad)


# --- launchers -----------------------------------------------------------------------------------------------


def test_kuberay_manifest():
    docs = [d for d in yaml.safe_load_all((ROOT / "launchers/kuberay/rayjob.yaml").read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("curvdist run /configs/job.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["workerGroupSpecs"]
    images = {c["image"] for c in head["containers"] + workers["template"]["spec"]["containers"]}
    assert len(images) == 1
    # the ConfigMap holding job.yaml is mounted at /configs where the entrypoint runs (the head)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (vol,) = [v for v in head["volumes"] if "configMap" in v]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts[vol["name"]] == "/configs"
    from curvdist.cli.config import validate_config

    validate_config(yaml.safe_load(cm["data"]["job.yaml"]))
    for c in head["containers"] + workers["template"]["spec"]["containers"]:
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in c["env"]


def test_sbatch_script_parses():
    script = ROOT / "launchers/slurm/curvdist.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray start --head" in text and "srun" in text and "export RAY_AUTH_MODE=" in text
    assert 'curvdist run "$CONFIG"' in text and "RAY_ADDRESS" in text


FAKE_SRUN = """#!/bin/bash
# srun on one machine: drop srun's own options, run the command here
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in -w|-N|-n|--nodelist) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""


def test_sbatch_script_runs_a_config_on_one_fake_slurm_node(tmp_path):
    """The whole script on a one-node 'allocation' (srun/scontrol stand-ins): Ray head up, the node joins,
    `curvdist run` computes, Ray is stopped afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    wd = _workdir(tmp_path)
    ray_tmp = tempfile.mkdtemp(prefix="cdslurm-", dir="/tmp")  # RAY_TMPDIR: not the machine's /tmp/ray
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="localhost", SLURM_CPUS_PER_TASK="1", RAY_TMPDIR=ray_tmp,
               RAY_PORT=str(_free_port()), DASHBOARD_PORT=str(_free_port()), DASHBOARD_HOST="127.0.0.1",
               RAY_START_ARGS=f"--dashboard-agent-listen-port={_free_port()} "
                              f"--ray-client-server-port={_free_port()} {OBJECT_STORE}", JOIN_TIMEOUT="120")
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "SLURM_GPUS_ON_NODE"):
        env.pop(k, None)
    proc = subprocess.Popen(["bash", str(ROOT / "launchers/slurm/curvdist.sbatch"), "job.yaml", "--output",
                             str(tmp_path / "slurm.json")], cwd=wd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
        for _ in range(30):  # the dashboard's forkserver outlives `ray start` by a few seconds
            left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True,
                                  text=True).stdout.splitlines()
            if not [p for p in left if "<defunct>" not in p]:
                break
            time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    assert "all 1 node(s) joined" in out and "wrote " in out
    assert json.loads((tmp_path / "slurm.json").read_text())["results"][0]["query"] == "eigs"
    assert not [p for p in left if "<defunct>" not in p], f"Ray processes left running: {left}"


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_dockerfile():
    path = ROOT / "docker/Dockerfile"
    ins = _dockerfile_instructions(path.read_text())
    names = [n for n, _ in ins]
    assert set(names) <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "CMD", "LABEL", "EXPOSE",
                          "ENTRYPOINT", "SHELL"}
    args = {a.split("=")[0]: a.split("=", 1)[1] for n, a in ins if n == "ARG" and "=" in a}
    (base,) = [a for n, a in ins if n == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    runs = " ".join(a for n, a in ins if n == "RUN")
    assert "python3.11" in runs and 'pip install ".[deepspeed]"' in runs
    assert 'ray[default]==${RAY_VERSION}' in runs and "torch==${TORCH_VERSION}" in runs
    import ray

    assert args["RAY_VERSION"] == ray.__version__  # the image's Ray is the one this project is tested with
    assert "--index-url" not in runs and "+cpu" not in runs and "whl/cpu" not in runs  # PyPI's CUDA build
    assert "COPY" in names and "USER" in names and names[-1] == "CMD"
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:
        r = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    ignore = (ROOT / "docker/Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "results"} <= set(ignore)
