"""curvdist.runtime: thread choice (explicit, environment, auto on a busy machine, size caps) and the user import
paths of the CLI (a factory module in the working directory or next to the config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from curvdist import runtime
from curvdist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "curvdist"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)


@pytest.fixture
def restore_threads():
    prev = torch.get_num_threads()
    yield prev
    torch.set_num_threads(prev)


def _machine(monkeypatch, cpus: int, idle: float | None) -> None:
    """Simulate a machine with ``cpus`` usable CPUs of which ``idle`` are free (None: no /proc/stat)."""
    monkeypatch.setattr(runtime, "available_cpus", lambda: cpus)
    monkeypatch.setattr(runtime, "sample_idle_cpus", lambda interval=runtime.SAMPLE_SECONDS: idle)


# ---------------------------------------------------------------------------------------------------------------
# explicit and invalid requests


@pytest.mark.parametrize("n", [1, 2, 3])
def test_explicit_int_is_honoured(n):
    assert runtime.choose_threads(requested=n) == n
    assert runtime.choose_threads(dim=10, requested=n) == n  # no size cap on an explicit request
    assert runtime.choose_threads(requested=str(n)) == n


def test_context_manager_sets_and_restores(restore_threads):
    torch.set_num_threads(2)
    with runtime.threads(1) as choice:
        assert choice.threads == 1 and torch.get_num_threads() == 1 and choice.source == "explicit"
        with runtime.threads(3) as inner:
            assert inner.threads == 3 and torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_context_manager_restores_on_error(restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"), runtime.threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_set_threads_applies_and_records(restore_threads):
    choice = runtime.set_threads(1)
    assert choice.threads == 1 and torch.get_num_threads() == 1
    assert choice.as_dict()["source"] == "explicit" and choice.as_dict()["threads"] == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, "many", True, [2], "0"])
def test_bad_requests_raise_config_error(bad):
    with pytest.raises(ConfigError, match="threads"):
        runtime.choose_threads(requested=bad)
    with pytest.raises(ConfigError):
        runtime.set_threads(bad)


def test_bad_dim_raises_config_error():
    with pytest.raises(ConfigError, match="dim"):
        runtime.choose_threads(dim=-1)


def test_bad_request_leaves_threads_alone(restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(ConfigError), runtime.threads(0):
        pass
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------------------------
# environment override


def test_env_overrides_request(monkeypatch):
    _machine(monkeypatch, cpus=8, idle=8.0)
    monkeypatch.setenv(runtime.ENV_VAR, "3")
    assert runtime.choose_threads() == 3
    assert runtime.choose_threads(requested=5) == 3
    assert runtime.choose_threads(dim=10) == 3
    assert runtime.thread_choice().source == "env"
    monkeypatch.setenv(runtime.ENV_VAR, "auto")
    assert runtime.choose_threads(requested=5) == 8  # env "auto" wins over an explicit 5
    monkeypatch.setenv(runtime.ENV_VAR, "")  # empty: as if unset
    assert runtime.choose_threads(requested=5) == 5


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_bad_env_raises_config_error_naming_it(monkeypatch, bad):
    monkeypatch.setenv(runtime.ENV_VAR, bad)
    with pytest.raises(ConfigError, match=runtime.ENV_VAR):
        runtime.choose_threads()


# ---------------------------------------------------------------------------------------------------------------
# auto


def test_auto_on_this_machine_is_in_range():
    n = runtime.choose_threads()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or 1)
    assert runtime.choose_threads(requested=None) in range(1, (os.cpu_count() or 1) + 1)
    assert 1 <= runtime.available_cpus() <= (os.cpu_count() or 1)
    assert 0.0 <= runtime.free_cpus(0.05) <= runtime.available_cpus()


def test_sampler_measures_something():
    idle = runtime.sample_idle_cpus(0.05)
    if idle is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= idle <= runtime.available_cpus()


@pytest.mark.parametrize("idle", [0.0, 0.4, 1.0, 1.6])
def test_auto_on_busy_two_cpu_machine_is_one(monkeypatch, idle):
    _machine(monkeypatch, cpus=2, idle=idle)  # one (or more) CPU-bound co-tenants
    assert runtime.choose_threads() == 1
    assert runtime.choose_threads(dim=10**7) == 1


def test_auto_uses_free_cpus(monkeypatch):
    _machine(monkeypatch, cpus=2, idle=1.95)
    assert runtime.choose_threads() == 2
    assert runtime.choose_threads(dim=10**6) == 2
    _machine(monkeypatch, cpus=16, idle=16.0)
    assert runtime.choose_threads() == 16
    _machine(monkeypatch, cpus=16, idle=5.1)  # 11 CPUs busy elsewhere
    assert runtime.choose_threads(dim=10**7) == 5
    choice = runtime.thread_choice(dim=10**7)
    assert choice.source == "auto" and choice.cpus == 16 and choice.free_cpus == pytest.approx(5.1)


def test_auto_small_problems_are_capped(monkeypatch):
    _machine(monkeypatch, cpus=16, idle=16.0)
    assert runtime.choose_threads(dim=1_210) == 1  # the quickstart's MLP
    assert runtime.choose_threads(dim=runtime.SMALL_DIM - 1) == 1
    assert runtime.choose_threads(dim=runtime.SMALL_DIM) == 2
    assert runtime.choose_threads(dim=runtime.MEDIUM_DIM - 1) == 2
    assert runtime.choose_threads(dim=runtime.MEDIUM_DIM) == 16
    assert runtime.choose_threads(dim=None) == 16


def test_small_problem_does_not_sample(monkeypatch):
    def boom(interval=0.0):
        raise AssertionError("sampled")

    monkeypatch.setattr(runtime, "sample_idle_cpus", boom)
    assert runtime.choose_threads(dim=100) == 1


def test_auto_falls_back_to_load_average(monkeypatch):
    _machine(monkeypatch, cpus=2, idle=None)  # no /proc/stat
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    monkeypatch.setattr(runtime, "_T0", runtime.time.monotonic())  # own CPU use unknown: counts as none
    assert runtime.choose_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.05, 0.1, 0.1))
    assert runtime.choose_threads() == 2


def test_set_threads_auto(monkeypatch, restore_threads):
    _machine(monkeypatch, cpus=2, idle=0.9)
    assert runtime.set_threads("auto").threads == 1
    assert torch.get_num_threads() == 1
    with runtime.threads(dim=100) as choice:
        assert choice.threads == 1 and choice.dim == 100


# ---------------------------------------------------------------------------------------------------------------
# user import paths


def test_user_import_paths_once_without_duplicates(tmp_path, monkeypatch):
    saved = list(sys.path)
    try:
        work, conf = tmp_path / "work", tmp_path / "conf"
        work.mkdir()
        conf.mkdir()
        monkeypatch.chdir(work)
        sys.path[:] = [p for p in sys.path if p != ""]
        added = runtime.user_import_paths(conf / "cfg.yaml")
        assert added == [str(work), str(conf)]
        assert sys.path[:2] == [str(work), str(conf)]
        assert runtime.user_import_paths(conf / "cfg.yaml") == []  # second call: nothing new
        assert sys.path.count(str(work)) == 1 and sys.path.count(str(conf)) == 1
        runtime.remove_import_paths(added)
        assert sys.path == [p for p in saved if p != ""]
        # config in the working directory: one entry; '' (the working directory) counts as present
        sys.path.insert(0, "")
        assert runtime.user_import_paths(work / "cfg.yaml") == []
        sys.path.remove("")
        assert runtime.user_import_paths("cfg.yaml") == [str(work)]
    finally:
        sys.path[:] = saved


def test_main_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    from curvdist.cli.main import main

    saved = list(sys.path)
    try:
        monkeypatch.chdir(tmp_path)
        assert main(["run", str(tmp_path / "missing.yaml"), "-q"]) == 2
        assert sys.path == saved
    finally:
        sys.path[:] = saved


MODULE = '''
import torch
from torch import nn


def net(in_features=5, hidden=4, out_features=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))


def data(n=12, in_features=5, out_features=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_features, generator=g), torch.randint(0, out_features, (n,), generator=g)
'''


def _user_project(folder: Path) -> tuple[str, Path]:
    """A factory module ``mymodels_<random>.py`` and a tiny config using it, in ``folder``."""
    name = f"mymodels_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(MODULE)
    cfg = {
        "seed": 0,
        "dtype": "float64",
        "model": {"factory": f"{name}:net", "kwargs": {"in_features": 5, "hidden": 4, "out_features": 3}},
        "data": {"factory": f"{name}:data", "kwargs": {"n": 12}},
        "loss": "cross_entropy",
        "curvature": "hessian",
        "queries": [{"kind": "grad_norm"}],
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return name, path


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CURVDIST_THREADS"] = "1"
    return subprocess.run([str(CLI), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _check(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["results"], doc
    assert "grad_norm" in json.dumps(doc["results"])


@pytest.mark.skipif(not CLI.exists(), reason="console script not installed next to the interpreter")
def test_cli_imports_module_from_working_directory(tmp_path):
    _, cfg = _user_project(tmp_path)
    proc = _run_cli(["run", cfg.name, "-q", "--output", "out.json"], cwd=tmp_path)
    _check(proc, tmp_path / "out.json")


@pytest.mark.skipif(not CLI.exists(), reason="console script not installed next to the interpreter")
def test_cli_imports_module_next_to_config(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    _, cfg = _user_project(project)
    out = elsewhere / "out.json"
    proc = _run_cli(["run", str(cfg), "-q", "--output", str(out)], cwd=elsewhere)
    _check(proc, out)
