"""Rebuilt only on change, for code: each rule's code inputs are its script's import closure
(trtflow.workflow.code_closure), so editing a library module reruns exactly the rules whose scripts
run it, and what depends on their outputs.
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor

from snakemake_runs import ROOT, clone, planned, snakemake
from trtflow.workflow import code_closure, imported_modules, module_file


def rule_scripts() -> dict[str, tuple[str, str]]:
    """rule name -> (its script's name, the rule's text), from the rule files."""
    found = {}
    for path in sorted((ROOT / "workflow/rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", path.read_text()):
            name, script = re.match(r"rule (\w+):", block), re.search(r'"\.\./scripts/(\w+)\.py"', block)
            if name and script:
                found[name.group(1)] = (script.group(1), block)
    return found


def test_every_rule_takes_its_own_scripts_code():
    rules = rule_scripts()
    assert {"engine", "verify", "calibrate", "reference", "report"} <= set(rules)
    for rule, (script, block) in rules.items():
        assert f'script_code("{script}")' in block, f"rule {rule} does not list the code of ../scripts/{script}.py"


def test_the_closure_follows_every_import(tmp_path):
    """Imports inside functions, `from package import submodule`, and the packages they pass through."""
    package = tmp_path / "trtflow"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from trtflow import b\n",
        "b.py": "from trtflow.sub.c import thing\n",
        "sub/__init__.py": "",
        "sub/c.py": "import os\nthing = 1\n",
        "unused.py": "import trtflow.a\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    script = tmp_path / "script.py"
    script.write_text("import json\nfrom trtflow.a import f\n")
    closure = code_closure(script, package)
    assert [str(path.relative_to(package)) for path in closure] == [
        "__init__.py",
        "a.py",
        "b.py",
        "sub/__init__.py",
        "sub/c.py",
    ]


def test_the_run_side_does_not_run_the_build_wing():
    """verify's and bench's code: the head contract and the recorded network, not the wing that builds. The report
    and the PyTorch reference run neither: editing an executor reruns neither."""

    def closure(script):
        return {str(path.relative_to(src)) for path in code_closure(ROOT / f"workflow/scripts/{script}.py", src)}

    src = ROOT / "src/trtflow"
    for script in ("verify", "bench", "report", "reference"):
        assert not [name for name in closure(script) if name.startswith("build/")], script
    for script in ("verify", "bench"):
        assert {"run/netexec.py", "formats/network_record.py", "common/head.py"} <= closure(script), script
    for script in ("report", "reference"):
        assert "run/levels.py" in closure("report") and not closure(script) & {"run/executors.py", "run/netexec.py"}


# The layout is the architecture (docs/ARCHITECTURE.md): the build wing (trtflow.build) and the run wing (trtflow.run)
# meet through files in results/, whose formats are trtflow.formats, and share trtflow.common and trtflow.backend;
# artifacts, config, workflow and cli sit at the top. A sub-package's modules may import only the packages listed.
# precisions (the table of precisions) sits at the top beside artifacts and, like it, imports no trtflow module: every
# folder reads it (formats: the calibration table's scale rule; backend: the head dtype's names).
MAY_IMPORT = {
    # config: engine.batch's rule
    "build": {"build", "common", "formats", "backend", "artifacts", "precisions", "config"},
    "run": {"run", "common", "formats", "backend", "artifacts", "precisions"},
    "common": {"common", "formats", "backend", "artifacts", "precisions"},
    "formats": {"formats", "backend", "artifacts", "precisions"},
    "backend": {"backend", "common", "artifacts", "precisions"},  # the plugin library's loader is common.plugins
}
MAX_LEVELS = 8


def module_imports() -> dict[str, set[str]]:
    """trtflow module (dotted, from the package) -> the trtflow modules it imports."""
    src = ROOT / "src/trtflow"
    graph = {}
    for path in src.rglob("*.py"):
        name = ".".join(("trtflow", *path.relative_to(src).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = {module for module in imported_modules(path) if module_file(module, src) and module != name}
    return graph


def room(module: str) -> str:
    """The sub-package (or top-level module) of a dotted trtflow module: trtflow.run.verify -> run."""
    return (module.split(".") + [""])[1]


def test_each_sub_package_imports_only_what_its_place_allows():
    graph = module_imports()
    assert set(MAY_IMPORT) <= {room(name) for name in graph}, "a sub-package of the layout is gone"
    crossings = {
        name: sorted(module for module in imports if room(module) not in MAY_IMPORT[room(name)])
        for name, imports in graph.items()
        if room(name) in MAY_IMPORT
    }
    assert not {name: found for name, found in crossings.items() if found}


# The modules a rule's script runs as its stage (docs/ARCHITECTURE.md's table; `detect` is `trtflow detect`'s). A
# stage reads what another stage wrote, not its code: what two stages share is a module of neither (the executor
# ladder and LEVELS in `run.executors`, matching in `run.matching`, the plan's JSON in `formats.plan_metadata`). Not
# `model`: it holds the detector and features-network definitions both wings share (`common`); rule validate_model
# calls its save_validated_checkpoint.
STAGE_MODULES = {
    "build.data",
    "build.train",
    "build.export",
    "build.weights",
    "build.calibrate",
    "build.engine",
    "build.deploy",
    "common.plugins",
    "run.reference",
    "run.qdq_accuracy",
    "run.sensitivity",
    "run.verify",
    "run.bench",
    "run.report",
    "run.detect",
}


def test_no_stage_module_imports_another():
    graph = module_imports()
    assert {f"trtflow.{m}" for m in STAGE_MODULES} <= set(graph), "a stage names a module that is gone"
    crossings = {
        stage: sorted(found)
        for stage in sorted(STAGE_MODULES)
        if (found := {module.removeprefix("trtflow.") for module in graph[f"trtflow.{stage}"]} & STAGE_MODULES)
    }
    assert not crossings, f"stage modules that import another stage module: {crossings}"


def test_no_import_circle_and_at_most_eight_levels():
    graph = module_imports()

    def reachable(start):
        seen, stack = set(), list(graph[start])
        while stack:
            module = stack.pop()
            if module not in seen:
                seen.add(module)
                stack.extend(graph.get(module, ()))
        return seen

    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, f"modules that import themselves through others: {circles}"
    levels: dict[str, int] = {}

    def level(name):  # 1 for a module that imports no trtflow module, else one above the highest it imports
        if name not in levels:
            levels[name] = 1 + max((level(module) for module in graph[name] if module in graph), default=0)
        return levels[name]

    highest = max(graph, key=level)
    assert level(highest) <= MAX_LEVELS, f"{highest} sits on level {level(highest)}"


def downstream(workdir) -> dict[str, set[str]]:
    """rule -> the rules of the default target that read its outputs, directly or not (snakemake --rulegraph)."""
    dot = snakemake(workdir, "--rulegraph").stdout
    names = dict(re.findall(r'(\d+)\[label = "(\w+)"', dot))
    edges = [(names[a], names[b]) for a, b in re.findall(r"(\d+) -> (\d+)", dot)]
    reach = {name: set() for name in names.values()}
    changed = True
    while changed:
        changed = False
        for source, target in edges:
            grown = reach[source] | {target} | reach[target]
            changed |= grown != reach[source]
            reach[source] = grown
    return reach


def test_editing_each_module_reruns_exactly_the_rules_that_run_it(completed_run, tmp_path):
    """One dry run per module, each after an edit of that module alone; the modules are shared out between two
    clones of the completed run, whose dry runs go side by side (one per core)."""
    runs = [clone(completed_run, tmp_path / f"run{i}") for i in range(2)]
    src = runs[0] / "src/trtflow"
    reach = downstream(runs[0])
    closures = {
        rule: {path.relative_to(src) for path in code_closure(runs[0] / f"workflow/scripts/{script}.py", src)}
        for rule, (script, _) in rule_scripts().items()
        if rule in reach
    }
    modules = sorted(path.relative_to(src) for path in src.rglob("*.py"))
    assert len(modules) >= 30

    def reruns_after_editing(run, share):
        """{module: the rules a dry run plans after an edit of that module alone} for the modules of `share`."""
        found = {}
        for module in share:
            path = run / "src/trtflow" / module
            text, stat = path.read_text(), path.stat()
            path.write_text(text + "\n# edited\n")  # newer than every output, and other contents
            try:
                found[module] = {job.split("[")[0] for job in planned(run)}
            finally:
                path.write_text(text)
                os.utime(path, (stat.st_atime, stat.st_mtime))
        return found

    with ThreadPoolExecutor(len(runs)) as pool:
        shares = [modules[i :: len(runs)] for i in range(len(runs))]
        reruns = {
            module: rules for found in pool.map(reruns_after_editing, runs, shares) for module, rules in found.items()
        }
    assert sorted(reruns) == modules
    for module in modules:
        importers = {rule for rule, closure in closures.items() if module in closure}
        expected = importers.union(*(reach[rule] for rule in importers))
        assert reruns[module] == expected, (
            f"editing {module}: reran {sorted(reruns[module])}, expected {sorted(expected)}"
        )
