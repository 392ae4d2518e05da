"""Generates the benchmark pages from benchmarks/results/*.json at build time (run by mkdocs-gen-files): tables and
plots drawn from the stored JSON, nothing re-measured. A JSON file no renderer knows still gets a section (its
setup and summary) on the index page, so every stored result is on the site."""

from __future__ import annotations

import ast
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------- helpers
def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e7):
            return f"{x:.2e}"
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v) for v in x)
    if isinstance(x, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in x.items())
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def script_doc(script: str) -> str:
    """The first paragraph of a benchmark script's docstring."""
    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / script).read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def source(files: list[str], script: str) -> str:
    names = ", ".join(f"`benchmarks/results/{f}`" for f in files)
    return f"*Data: {names}, written by `python benchmarks/{script}`.*\n"


class Page:
    """A Markdown page with figures, written through mkdocs-gen-files."""

    def __init__(self, path: str, title: str) -> None:
        self.path, self.parts, self.figures = path, [f"# {title}\n"], {}

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, name: str, fig: Any, caption: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self.figures[name] = buf.getvalue()
        self.parts.append(f"![{caption}]({name})\n\n*{caption}*\n")

    def write(self, open_file: Callable[..., Any]) -> None:
        folder = str(Path(self.path).parent)
        with open_file(self.path, "w") as f:
            f.write("\n".join(self.parts))
        for name, data in self.figures.items():
            with open_file(f"{folder}/{name}", "wb") as f:
                f.write(data)


def machine_line(d: dict[str, Any]) -> str:
    m = d.get("machine") or {}
    keys = {k: m.get(k, d.get(k)) for k in ("cpus", "cpu_count", "threads", "torch", "python", "device")}
    return "*Machine: " + ", ".join(f"{k} {v}" for k, v in keys.items() if v not in (None, "")) + ".*\n"


# ----------------------------------------------------------------------------------------------- pages
def eigs_page() -> Page:
    p = Page("benchmarks/eigs.md", "Eigenvalues and traces")
    d = load("eigs_benchmark.json")
    p.add(script_doc("eigs_benchmark.py") + "\n")
    p.add(source(["eigs_benchmark.json"], "eigs_benchmark.py") + machine_line(d))
    p.add(f"## Top-{d['k']} Hessian eigenvalues at tolerance {d['tol']:g}\n")
    rows = []
    for model, r in d["eigs"].items():
        for solver in ("curvdist", "curvlinops+eigsh", "pyhessian"):
            s = r.get(solver)
            if s:
                rows.append([model, r["params"], solver, s["seconds"], s.get("matvecs"), s["max_rel_error"]])
    p.add(table(["model", "parameters", "solver", "seconds", "matvecs", "max. relative error"], rows))
    p.add(table(["model", "HVP time / gradient time"],
                [[m, r["ratio"]] for m, r in d["hvp_over_grad"].items()]))
    tr = d["trace"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, errs in tr["mean_rel_error"].items():
        ax1.loglog(tr["budgets"], errs, "-o", ms=3, label=method)
    ax1.set_xlabel("matvec budget")
    ax1.set_ylabel("mean relative error")
    ax1.set_title(f"trace of the Hessian, {tr['model']} ({tr['seeds']} seeds)", fontsize=10)
    ax1.legend(fontsize=8)
    models = list(d["eigs"])
    solvers = ["curvdist", "curvlinops+eigsh", "pyhessian"]
    width = 0.25
    for j, solver in enumerate(solvers):
        ax2.bar([i + (j - 1) * width for i in range(len(models))],
                [d["eigs"][m].get(solver, {}).get("seconds", 0) for m in models], width, label=solver)
    ax2.set_xticks(range(len(models)), models)
    ax2.set_ylabel("seconds")
    ax2.set_title(f"top-{d['k']} eigenvalues", fontsize=10)
    ax2.legend(fontsize=8)
    p.add("## Trace estimators: error against budget\n")
    p.add(table(["matvecs"] + list(tr["mean_rel_error"]),
                [[b] + [tr["mean_rel_error"][m][i] for m in tr["mean_rel_error"]] for i, b in enumerate(tr["budgets"])]))
    p.figure("eigs_benchmark.png", fig, "Left: mean relative error of the trace estimators against the number of "
                                        "products. Right: time for the top eigenvalues.")

    lz = load("lanczos_benchmark.json")
    p.add("## Lanczos against ARPACK at 11.2M parameters\n")
    p.add(script_doc("lanczos_benchmark.py") + "\n")
    p.add(source(["lanczos_benchmark.json"], "lanczos_benchmark.py"))
    p.add(f"Operator: {lz['operator']}; {lz['steps']} steps in {lz['dtype']}; ARPACK call `{lz['arpack_call']}`. "
          f"Goal: {lz['goal']}.\n")
    rows, labels, secs, peaks = [], [], [], []
    for name, sc in lz["scenarios"].items():
        for solver, runs in sc["runs"].items():
            ok = [r for r in runs if "seconds" in r]
            if not ok:
                continue
            med = sorted(r["seconds"] for r in ok)[len(ok) // 2]
            peak = max(r.get("peak_rss_bytes", 0) for r in ok) / 2**30
            rows.append([name, solver, sc.get("threads"), len(ok), med, peak, ok[0].get("abs_error")])
            labels.append(f"{name}\n{solver}")
            secs.append(med)
            peaks.append(peak)
    p.add(table(["scenario", "solver", "threads", "runs", "median seconds", "peak RSS (GiB)", "abs. error"], rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["C0" if "curvdist" in lab else "C1" for lab in labels]
    ax1.bar(range(len(secs)), secs, color=colors)
    ax2.bar(range(len(peaks)), peaks, color=colors)
    for ax, ylabel in ((ax1, "median seconds"), (ax2, "peak RSS (GiB)")):
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
    p.figure("lanczos_benchmark.png", fig, "curvdist's Lanczos (blue) against ARPACK (orange): 30 products at "
                                           "11.2M parameters, idle and with a CPU-bound co-tenant.")
    return p


def _hvp_section(p: Page, name: str, figname: str) -> None:
    d = load(name)
    p.add(f"### `{name}`\n")
    p.add(f"*{d.get('cpus')} CPUs, {d.get('threads')} thread(s), {d.get('reps')} repetitions, torch {d.get('torch')}; "
          f"load average {fmt(d.get('load_average_at_start'))} at the start.*\n")
    rows, fig_models = [], []
    for model, m in d["models"].items():
        per = m.get("per_product_s", {})
        grad = per.get("gradient", {}).get("median")
        fig_models.append((model, {k: v["median"] / grad for k, v in per.items() if grad and "median" in v}))
        for mode, stats in per.items():
            diff = m.get("relative_difference_to_baseline", {}).get(mode)
            rows.append([model, mode, stats.get("median"), stats.get("min"),
                         stats["median"] / grad if grad else None, diff])
        if m.get("description"):
            p.add(f"- **{model}**: {m['description']}; {m.get('parameters', 0):,} parameters; `auto` chose "
                  f"`{(m.get('auto') or {}).get('mode')}`.")
    p.add("")
    p.add(table(["model", "product", "median s", "min s", "median / gradient", "rel. difference to baseline"], rows))
    fig, axes = plt.subplots(1, len(fig_models), figsize=(4 * len(fig_models), 3.6), squeeze=False)
    for ax, (model, ratios) in zip(axes[0], fig_models):
        keys = list(ratios)
        ax.barh(range(len(keys)), [ratios[k] for k in keys], color="C0")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median time / gradient")
        ax.set_title(model, fontsize=10)
    p.figure(figname, fig, f"{name}: each product's median time relative to a gradient.")


def results_of(p: Page, script: str) -> list[str]:
    """Add the benchmark script's docstring and its result files' provenance to ``p``; the files
    (``benchmarks/results/<script stem>*.json``), sorted."""
    p.add(script_doc(script) + "\n")
    files = sorted(f.name for f in RESULTS.glob(f"{Path(script).stem}*.json"))
    p.add(source(files, script))
    return files


def scale_page() -> Page:
    p = Page("benchmarks/scale.md", "Products and Lanczos at scale")
    p.add("## Hessian-vector product modes\n")
    files = results_of(p, "hvp_benchmark.py")
    for i, name in enumerate(files):
        _hvp_section(p, name, f"hvp_{i}.png")

    p.add("## GPT-2 small: products against curvlinops and hessian-eigenthings\n")
    files = results_of(p, "lm_benchmark.py")
    for i, name in enumerate(files):
        d = load(name)
        args = d.get("args", {})
        p.add(f"### `{name}`\n")
        p.add(f"*batch {args.get('batch')} × {args.get('tokens')} tokens, {args.get('threads')} threads, "
              f"device {args.get('device')}.*\n")
        rows = []
        for key, r in d["results"].items():
            rows.append([key, r.get("best_s"), r.get("peak_above_baseline_mb"),
                         d["summary"].get("time_over_gradient", {}).get(key),
                         d["summary"].get("memory_over_gradient", {}).get(key)])
        p.add(table(["measurement", "best s", "peak above baseline (MB)", "time / gradient", "memory / gradient"],
                    rows))
        tog = {k: v for k, v in d["summary"].get("time_over_gradient", {}).items() if v is not None}
        mog = {k: v for k, v in d["summary"].get("memory_over_gradient", {}).items() if v is not None}
        if tog:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
            for ax, data, label in ((ax1, tog, "time / gradient"), (ax2, mog, "peak memory / gradient")):
                keys = list(data)
                ax.barh(range(len(keys)), [data[k] for k in keys],
                        color=["C0" if k.startswith("curvdist") else "0.6" for k in keys])
                ax.set_yticks(range(len(keys)), keys, fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel(label)
            p.figure(f"lm_{i}.png", fig, f"{name}: curvdist's products (blue) and the peers' (grey), relative to "
                                         f"one gradient.")
        for note in d.get("notes", []):
            p.add(f"- {note}")
        p.add("")

    d = load("distributed_benchmark.json")
    p.add("## One product locally, in Ray data mode and in pipeline mode\n")
    p.add(script_doc("distributed_benchmark.py") + "\n")
    p.add(source(["distributed_benchmark.json"], "distributed_benchmark.py"))
    p.add(f"*{d['params']:,} parameters, {d['samples']} samples, {d['dtype']}, {d['threads']} threads, "
          f"{d['cpu_count']} CPUs.*\n")
    rows = []
    for kind, r in d["products"].items():
        rows.append([kind, r["local"], r["data_1"]["wall"], r["data_2"]["wall"], r["data_2"].get("overhead"),
                     r["pipeline_2"]["wall"], r.get("speedup_2_vs_1_workers")])
    p.add(table(["product", "local s", "data, 1 worker s", "data, 2 workers s", "Ray overhead (2 workers) s",
                 "pipeline, 2 stages s", "speed-up 2 vs 1 workers"], rows))
    return p


def sharded_page() -> Page:
    p = Page("benchmarks/sharded.md", "Sharded: pipeline stages and ZeRO-3 partitions")
    files = results_of(p, "sharded_benchmark.py")
    for i, name in enumerate(files):
        d = load(name)
        setup = d.get("setup", {})
        p.add(f"## `{name}`\n")
        p.add(f"*{setup.get('model')}, batch {setup.get('batch')} × {setup.get('tokens')} tokens, "
              f"{setup.get('threads')} threads, device {setup.get('device')}, Lanczos tol {setup.get('tol')} "
              f"(at most {setup.get('max_steps')} steps).*\n")
        rows, mem = [], {}
        for key, r in d["results"].items():
            if "error" in r and "memory" not in r:
                rows.append([key, None, None, None, None, None, None, None, f"not run: {str(r['error'])[:120]}"])
                continue
            eig = r.get("eig") if isinstance(r.get("eig"), dict) else {}
            value = eig.get("value")
            rows.append([key, r.get("parameters"), r.get("ggn_product_s"), r.get("hessian_product_s"),
                         eig.get("seconds"), value[0] if isinstance(value, list) else value, eig.get("matvecs"),
                         {True: "yes", False: "no"}.get(eig.get("converged"), "not recorded") if eig else None, ""])
            if r.get("memory"):
                mem[key] = [(m["role"], m.get("parameters", 0), m.get("peak_rss_mb")) for m in r["memory"]]
        p.add(table(["configuration", "parameters", "GGN product s", "Hessian product s", "top eigenvalue s",
                     "top eigenvalue", "products", "converged", "note"], rows))
        if mem:
            fig, ax = plt.subplots(figsize=(11, 3.8))
            pos, ticks, labels = 0, [], []
            for j, (key, procs) in enumerate(mem.items()):
                xs = [pos + k for k in range(len(procs))]
                ax.bar(xs, [(m or 0) / 1024 for _, _, m in procs], color=f"C{j % 10}", label=key)
                ticks += xs
                labels += [role for role, _, _ in procs]
                pos += len(procs) + 1
            ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("peak RSS during the query (GB)")
            ax.legend(fontsize=7, ncol=2)
            p.figure(f"sharded_{i}.png", fig, f"{name}: peak resident memory of every process, per configuration.")
            rows = [[key, role, params, peak] for key, procs in mem.items() for role, params, peak in procs]
            p.add("<details><summary>Memory per process</summary>\n")
            p.add(table(["configuration", "process", "parameters held", "peak RSS (MB)"], rows))
            p.add("</details>\n")
        summary = d.get("summary", {})
        flat = [[k, v] for k, v in summary.items() if not isinstance(v, dict)]
        if flat:
            p.add(table(["goal", "met"], flat))
        z = d["results"].get("zero3_2ranks")
        if z and "ggn_relative_error" in z:
            p.add("**ZeRO-3 on 2 ranks** (finite-difference products on the partitions, against exact float32 "
                  "products on one process): "
                  f"GGN product relative error {fmt(z.get('ggn_relative_error'))}, Hessian "
                  f"{fmt(z.get('hessian_relative_error'))}; a GGN product costs {fmt(z.get('ggn_over_train_step'))} "
                  f"training steps, a Hessian product {fmt(z.get('hessian_over_train_step'))}.\n")
        for key, att in (d.get("attempts") or {}).items():
            p.add(f"*Attempt `{key}`: {fmt(att.get('note', ''))}*\n")

    runs = sorted((RESULTS / "gpt2_small").glob("*.json")) if (RESULTS / "gpt2_small").is_dir() else []
    if runs:
        p.add("## `curvdist run configs/lm/gpt2_small.yaml`: θ against ψ (NTK) on GPT-2 small\n")
        p.add("Reports of `curvdist run` (their JSON) in `benchmarks/results/gpt2_small/`: the invariance table of "
              "each run, θ against the NTK-reparametrized ψ.\n")
        rows = []
        for f in runs:
            d = json.loads(f.read_text())
            for r in d.get("invariance", []):
                rows.append([f.name, r["quantity"], r["curvature"], r["metric"], r["theta"], r["psi"],
                             r["relative_change"]])
        p.add(table(["run", "quantity", "curvature", "metric", "θ", "ψ", "relative change"], rows))
    return p


def training_page() -> Page:
    p = Page("benchmarks/training.md", "Optimizers and training")
    d = load("optimizer_benchmark.json")
    p.add("## RiemannianSGD's step time per metric\n")
    p.add(script_doc("optimizer_benchmark.py") + "\n")
    p.add(source(["optimizer_benchmark.json"], "optimizer_benchmark.py") + machine_line(d))
    rows = []
    for model, kinds in d["step_time"].items():
        for kind, r in kinds.items():
            if isinstance(r, dict):
                rows.append([model, kind, r.get("seconds_per_step"), r.get("vs_sgd"), r.get("vs_adam"),
                             r.get("seconds_per_refresh")])
    p.add(table(["model", "optimizer / metric", "s per step (amortized)", "vs SGD", "vs Adam", "s per refresh"],
                rows))
    tt = d["time_to_target"]
    p.add(f"Time to training loss ≤ {tt['target_loss']} (at most {tt['max_steps']} steps), best learning rate of "
          "each:\n")
    p.add(table(["method", "lr", "steps", "seconds", "final loss"],
                [[m, r["lr"], r["steps"], r["seconds"], r["final_loss"]] for m, r in tt["best"].items()]))

    d = load("train_benchmark.json")
    p.add("## Wall time to a target validation loss\n")
    p.add(script_doc("train_benchmark.py") + "\n")
    p.add(source(["train_benchmark.json"], "train_benchmark.py"))
    setup = d.get("setup", {})
    p.add("*Setup: " + ", ".join(f"{k} {fmt(v)}" for k, v in setup.items()) + ".*\n")
    tasks = sorted({r["task"] for r in d["runs"]})
    color = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in d["runs"]}))}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        best = d["summary"].get(task, {}).get("methods", {})
        for method, row in sorted(best.items()):
            run = next((r for r in d["runs"] if r["task"] == task and r["method"] == method and r["lr"] == row["lr"]
                        and r.get("curve")), None)
            if run:
                ax.plot([c["seconds"] for c in run["curve"]], [c["val"] for c in run["curve"]], lw=1,
                        color=color[method], label=f"{method} lr={row['lr']:g}")
        target = d["summary"].get(task, {}).get("target_val")
        if target:
            ax.axhline(target, color="k", ls=":", lw=1, label="target (AdamW's best)")
        ax.set_yscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("validation loss")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7)
    p.figure("train_benchmark.png", fig, "Validation loss against wall time, each method at its best learning rate "
                                         "of the grid.")
    for task in tasks:
        s = d["summary"].get(task, {})
        p.add(f"### {task}\n")
        p.add(f"Target validation loss: {fmt(s.get('target_val'))}.\n")
        p.add(table(["method", "lr", "best validation", "time to target (s)", "steps to target", "median step s",
                     "peak RSS (MB)", "time / AdamW's"],
                    [[m, r.get("lr"), r.get("best_val"), r.get("time_to_target_s"), r.get("steps_to_target"),
                      r.get("median_step_s"), r.get("peak_rss_mb"), r.get("over_adamw")]
                     for m, r in sorted(s.get("methods", {}).items())]))
        goals = [[k, v] for k, v in s.items() if k.startswith("goal")]
        if goals:
            p.add(table(["goal", "met"], goals))
    return p


KNOWN = {
    "eigs_benchmark.json": "eigs.md", "lanczos_benchmark.json": "eigs.md", "hvp_benchmark.json": "scale.md",
    "hvp_benchmark_compile.json": "scale.md", "hvp_benchmark_resnet224.json": "scale.md",
    "lm_benchmark.json": "scale.md", "lm_benchmark_2x64.json": "scale.md", "distributed_benchmark.json": "scale.md",
    "sharded_benchmark_gpt2_small.json": "sharded.md", "sharded_benchmark_gpt2_medium.json": "sharded.md",
    "sharded_benchmark_gpt2_small_b8.json": "sharded.md", "lm_benchmark_budget.json": "scale.md",
    "lm_benchmark_budget_keep_freed.json": "scale.md",
    "optimizer_benchmark.json": "training.md", "train_benchmark.json": "training.md",
}


def index_page() -> Page:
    p = Page("benchmarks/index.md", "Benchmarks")
    p.add("Every page here is regenerated from the JSON files in `benchmarks/results/` when the site is built: the "
          "tables and plots are drawn from the stored measurements, nothing is re-measured. Each benchmark script "
          "in `benchmarks/` writes its JSON (and says how in its docstring); rerun one, rebuild the site, and its "
          "page follows. Most were measured on the project's 2-core CPU machines, often with other work running "
          "(the JSON records the load average where the script measured it).\n")
    rows = []
    for f in sorted(RESULTS.rglob("*.json")):
        rel = f.relative_to(RESULTS).as_posix()
        page = KNOWN.get(rel, "sharded.md" if rel.startswith("gpt2_small/") else None)
        rows.append([f"`{rel}`", f"[{page.removesuffix('.md')}]({page})" if page else "below", f"{f.stat().st_size:,}"])
    p.add(table(["file", "page", "bytes"], rows).replace("\\|", "|"))
    others = [f for f in sorted(RESULTS.glob("*.json")) if f.name not in KNOWN]
    for f in others:
        d = json.loads(f.read_text())
        p.add(f"## `{f.name}`\n")
        for key in ("setup", "summary", "machine"):
            if isinstance(d.get(key), dict):
                p.add(f"**{key}**\n")
                p.add(table(["key", "value"], [[k, v] for k, v in d[key].items()]))
    return p


def main() -> None:
    import mkdocs_gen_files

    for make in (index_page, eigs_page, scale_page, sharded_page, training_page):
        make().write(mkdocs_gen_files.open)


if __name__ in ("__main__", "<run_path>"):
    main()
