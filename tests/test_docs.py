"""Cheap checks of the documentation site (the strict build itself runs in CI after the tests: .ci/run).

- every ``::: identifier`` of the API pages imports, and the reference covers the public entry points;
- the config reference generated from the pydantic schema has a row for every field of every model;
- the executed examples are all on the site, use the public API and import no torchvision;
- the README stays a front page (≤ 200 lines) whose links into docs/ exist and whose test command is .ci/run's.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_gen_{name}", DOCS / "gen" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts write pages only when mkdocs-gen-files runs them
    return module


def _identifiers() -> dict[str, Path]:
    out = {}
    for page in DOCS.rglob("*.md"):
        for ident in re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.M):
            out[ident] = page
    return out


def _resolve(ident: str):
    parts = ident.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(ident)


def test_every_api_reference_identifier_imports():
    idents = _identifiers()
    assert len(idents) > 30
    broken = []
    for ident, page in idents.items():
        try:
            _resolve(ident)
        except (ImportError, AttributeError) as e:
            broken.append(f"{page.relative_to(ROOT)}: {ident} ({e})")
    assert not broken, broken


def test_api_reference_covers_the_public_entry_points():
    import curvdist as cd

    documented = {_resolve(i) for i in _identifiers()}
    documented |= {v for m in list(documented) if isinstance(m, type(cd)) for k, v in vars(m).items()
                   if not k.startswith("_")}  # a documented module documents its members
    public = ["Problem", "ProblemSpec", "ShardedProblem", "operator", "metric", "eigs", "trace", "diag", "logdet",
              "density", "grad_norm", "flatness", "block_spectra", "evidence", "reparametrize", "riemannian_hessian",
              "ray_backend", "Result", "CurvdistError", "threads", "set_threads"]
    missing = [name for name in public if getattr(cd, name) not in documented]
    from curvdist.integrations.deepspeed import CurvatureMonitor, DeepSpeedRiemannianSGD
    from curvdist.optim import RiemannianSGD

    missing += [c.__name__ for c in (RiemannianSGD, CurvatureMonitor, DeepSpeedRiemannianSGD) if c not in documented]
    assert not missing, missing


def test_config_reference_covers_every_field_of_the_schema():
    from pydantic import BaseModel

    from curvdist.cli import config as cli_config
    from curvdist.queries import specs

    gen = _load("config_reference")
    text = gen.render()
    models = gen.all_models()
    # every concrete model the config modules define is reached by the generator (bases such as QueryBase aside)
    defined = {m for mod in (cli_config, specs) for m in vars(mod).values()
               if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == mod.__name__}
    bases = {b for m in defined for b in m.__mro__[1:]}
    assert defined - bases <= set(models), (defined - bases) - set(models)
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for model in models:
        section = next((s for s in sections if f"{{#{gen.anchor(model)}}}" in s.splitlines()[0]), None)
        assert section is not None, f"no section for {model.__name__}"
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in section, f"{model.__name__}.{name} is not in the config reference"
    assert "**required**" in text and "`hutchpp`" in text


def test_examples_are_on_the_site_and_use_the_public_api():
    gen = _load("examples")
    scripts = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    assert sorted(gen.EXAMPLES) == scripts
    assert len(scripts) >= 3
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    flat = str(nav)
    for name in scripts:
        source = (ROOT / "examples" / f"{name}.py").read_text()
        assert "import curvdist as cd" in source and "torchvision" not in source, name
        assert f"{name}.png" in source, f"{name} must write {name}.png"
        assert f"examples/{name}.md" in flat, f"{name} is not in the site's navigation"
        title, body = gen.describe(name)
        assert title and body, f"{name} needs a docstring: a title line and a description"


def test_nav_pages_exist_or_are_generated():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from pages(v)
        elif isinstance(node, list):
            for v in node:
                yield from pages(v)

    generated = {"reference/config.md", "examples/index.md", "benchmarks/index.md", "benchmarks/eigs.md",
                 "benchmarks/scale.md", "benchmarks/sharded.md", "benchmarks/training.md"}
    generated |= {f"examples/{n}.md" for n in _load("examples").EXAMPLES}
    missing = [p for p in pages(nav) if p not in generated and not (DOCS / p).is_file()]
    assert not missing, missing


def test_readme_is_a_front_page_linking_into_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    doc_links = [link for link in links if link.startswith("docs/")]
    assert len(doc_links) >= 5
    missing = [link for link in doc_links if not (ROOT / link).exists()]
    assert not missing, missing
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in readme, "the README's second command must be exactly what .ci/run executes"
    assert "mkdocs build --strict" in ci[0]


@pytest.mark.parametrize("name", ["concept_figures", "benchmarks"])
def test_build_time_generators_import(name):
    module = _load(name)
    assert callable(module.main)
