"""Runs the examples in examples/ when the site is built (mkdocs-gen-files) and makes a page of each: its
description (the script's docstring), the figure it wrote, what it printed, its run time and its source.

Each example runs in its own process as ``python examples/NAME.py OUTDIR`` from the repository root and must write
``OUTDIR/NAME.png``; a failing example, or one that writes no figure, fails the build. ``CURVDIST_DOCS_EXAMPLES=0``
skips running them (pages without figures, for a quick local preview only; CI always runs them)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the executed examples, in the order of the site's navigation
EXAMPLES = ["density_theta_psi", "sharpness_during_training", "gpt2_block_spectra", "pipeline_memory",
            "preconditioned_training"]
TIMEOUT_S = 300


def describe(name: str) -> tuple[str, str]:
    """(title, description) from the example's docstring: its first line and the paragraphs after it."""
    doc = ast.get_docstring(ast.parse((ROOT / "examples" / f"{name}.py").read_text())) or name
    title, _, body = doc.partition("\n")
    return title.strip().rstrip("."), body.strip()


def run(name: str, out: Path, tries: int = 2) -> tuple[str, float]:
    """Run one example; a failure is retried once (an embedded Ray instance can fail to start on a loaded machine),
    and a second failure fails the build with the example's stderr."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    for attempt in range(1, tries + 1):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        seconds = time.perf_counter() - t0
        if proc.returncode == 0:
            break
        message = f"example {name} failed (exit {proc.returncode}, try {attempt} of {tries}):\n{proc.stderr[-4000:]}"
        if attempt == tries:
            raise RuntimeError(message)
        print(message, file=sys.stderr)
    if not (out / f"{name}.png").is_file():
        raise RuntimeError(f"example {name} wrote no {name}.png")
    return proc.stdout, seconds


def page(name: str, stdout: str | None, seconds: float | None) -> str:
    title, body = describe(name)
    source = (ROOT / "examples" / f"{name}.py").read_text()
    parts = [f"# {title}", "", body, ""]
    if stdout is None:
        parts += ['!!! note "Not run"', "    This build skipped the examples (`CURVDIST_DOCS_EXAMPLES=0`).", ""]
    else:
        parts += [f"![{title}]({name}.png)", "",
                  f"*Run when this site was built: `python examples/{name}.py`, {seconds:.1f} s.*", "",
                  "## Output", "", "```text", stdout.rstrip(), "```", ""]
    parts += ["## Source", "", f"`examples/{name}.py`", "", "```python", source.rstrip(), "```", ""]
    return "\n".join(parts)


def main() -> None:
    import mkdocs_gen_files

    execute = os.environ.get("CURVDIST_DOCS_EXAMPLES", "1") != "0"
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name in EXAMPLES:
            stdout, seconds = run(name, out) if execute else (None, None)
            with mkdocs_gen_files.open(f"examples/{name}.md", "w") as f:
                f.write(page(name, stdout, seconds))
            if execute:
                with mkdocs_gen_files.open(f"examples/{name}.png", "wb") as f:
                    f.write((out / f"{name}.png").read_bytes())
                total += seconds
            title, body = describe(name)
            rows.append(f"| [{title}]({name}.md) | {body.split('.')[0].strip()}. | "
                        f"{'—' if seconds is None else f'{seconds:.1f} s'} |")
    index = ["# Examples", "",
             "Each example is a script in `examples/` that uses only the public API (`import curvdist as cd`), is "
             "seeded, builds its model and data from code (nothing is downloaded) and writes one figure. They run "
             "every time this site is built (`mkdocs build`), so their figures and printed numbers are those of "
             "the current code. Run one yourself with `python examples/NAME.py [OUTDIR]` (default "
             "`results/examples/`).", "",
             "| example | what it shows | run time at this build |", "| --- | --- | --- |", *rows, "",
             f"Total: {total:.0f} s." if execute else "", ""]
    with mkdocs_gen_files.open("examples/index.md", "w") as f:
        f.write("\n".join(index))


if __name__ in ("__main__", "<run_path>"):
    main()
