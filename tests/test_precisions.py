"""One table of precisions (trtflow.precisions, issue 24): the schema and config.yaml repeat its names and default
thresholds for users, the rules take their {precision} constraint from it, and no code outside it names a precision
in a branch or a list of its own."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from trtflow.backend.dtypes import HEAD_DTYPES, TORCH_DTYPES

TORCH_DTYPE_NAMES = {str(dtype).removeprefix("torch.") for dtype in TORCH_DTYPES.values()}
from trtflow.precisions import (
    DEFAULT_NAMES,
    EXPORTED_GRAPH,
    NAMES,
    PRECISIONS,
    QDQ_GRAPH,
    calibrated,
    features_graph,
    precision,
    precision_qdq_graph,
    wildcard_pattern,
)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src/trtflow"
TABLE = SRC / "precisions.py"


def schema_differences(schema: dict) -> list[str]:
    """Where the config schema's precision names and default thresholds differ from the table."""
    properties = schema["properties"]
    engine_precisions = properties["engine"]["properties"]["precisions"]
    verify = properties["verify"]["properties"]
    found = {
        "engine.precisions enum": (engine_precisions["items"]["enum"], NAMES),
        "engine.precisions default": (engine_precisions["default"], DEFAULT_NAMES),
        "verify.enforce enum": (verify["enforce"]["items"]["enum"], NAMES),
        "verify.enforce default": (verify["enforce"]["default"], NAMES),
        "verify.thresholds names": (list(verify["thresholds"]["properties"]), NAMES),
    }
    problems = [
        f"{key}: {value} (the table: {list(names)})" for key, (value, names) in found.items() if value != list(names)
    ]
    for name, entry in verify["thresholds"]["properties"].items():
        if name in PRECISIONS and entry.get("default") != dict(PRECISIONS[name].verify_thresholds):
            problems.append(f"verify.thresholds.{name} default: {entry.get('default')}")
    return problems


def config_differences(config: dict) -> list[str]:
    """Where config.yaml's precisions and thresholds differ from the table's (config.yaml spells out the defaults)."""
    problems = []
    for key, value, names in (
        ("engine.precisions", config["engine"]["precisions"], DEFAULT_NAMES),
        ("verify.enforce", config["verify"]["enforce"], NAMES),
    ):
        if value != list(names):
            problems.append(f"{key}: {value} (the table: {list(names)})")
    thresholds = config["verify"]["thresholds"]
    if list(thresholds) != list(NAMES):
        problems.append(f"verify.thresholds names: {list(thresholds)}")
    problems += [
        f"verify.thresholds.{name}: {thresholds[name]}"
        for name in NAMES
        if name in thresholds and thresholds[name] != dict(PRECISIONS[name].verify_thresholds)
    ]
    return problems


def test_the_schema_repeats_the_table():
    assert not schema_differences(yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text()))


def test_config_yaml_repeats_the_table():
    assert not config_differences(yaml.safe_load((ROOT / "config.yaml").read_text()))


def test_a_schema_with_another_name_differs():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    schema["properties"]["engine"]["properties"]["precisions"]["items"]["enum"].append("bf16")
    assert schema_differences(schema) == [f"engine.precisions enum: {[*NAMES, 'bf16']} (the table: {list(NAMES)})"]


# A {precision} wildcard constraint: `precision=<expression>` in a wildcard_constraints block.
CONSTRAINT = re.compile(r"^\s*precision\s*=\s*(.+?),?\s*(?:#.*)?$")


def precision_constraints(text: str) -> list[str]:
    """The expressions of the {precision} constraints in the wildcard_constraints blocks (global or a rule's) of a
    Snakemake file: the lines indented deeper than the block's `wildcard_constraints:` line."""
    found, block_indent = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() == "wildcard_constraints:":
            block_indent = indent
        elif block_indent is not None and line.strip() and indent <= block_indent:
            block_indent = None
        elif block_indent is not None and (match := CONSTRAINT.match(line)):
            found.append(match.group(1))
    return found


def workflow_files() -> list[Path]:
    return [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]


def test_the_wildcard_constraint_is_the_tables():
    constraints = {path.name: precision_constraints(path.read_text()) for path in workflow_files()}
    assert {name: found for name, found in constraints.items() if found} == {"common.smk": ["wildcard_pattern()"]}
    pattern = wildcard_pattern()
    assert [name for name in NAMES if re.fullmatch(pattern, name)] == list(NAMES)
    assert not [word for word in ("bf16", "int8x", "fp", "", "fp32|fp16") if re.fullmatch(pattern, word)]


def test_a_literal_constraint_is_found():
    text = 'rule engine:\n    wildcard_constraints:\n        precision="fp32|fp16|int8",\n    params:\n        a=1,\n'
    assert precision_constraints(text) == ['"fp32|fp16|int8"']


# -- no precision named outside the table -----------------------------------------------------------------------------


def names_precision(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in PRECISIONS


def mostly_precisions(nodes) -> bool:
    """Two or more precisions' names, and more than half of the elements: a list of precisions (where a vocabulary
    that holds a few of the words besides others, as the engine inspector's dtype words, is none)."""
    count = sum(map(names_precision, nodes))
    return count > 1 and 2 * count > len(nodes)


def precision_branches(tree: ast.AST) -> list[str]:
    """Lines of a Python syntax tree that name a precision where the table should be read: a comparison with a
    precision's name (`== "int8"`, `"int8" in ...`), a subscript by one (`MODES["int8"]`), or a literal collection
    of them (a tuple, list or set of them, a dict keyed by them)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            hit = any(names_precision(operand) for operand in (node.left, *node.comparators))
        elif isinstance(node, ast.Subscript):
            hit = names_precision(node.slice)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hit = mostly_precisions(node.elts)
        elif isinstance(node, ast.Dict):
            hit = mostly_precisions(node.keys)
        else:
            hit = False
        if hit:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


# The same in a Snakemake file (not Python's syntax): a comparison with a quoted name, or a constraint listing names.
SNAKEMAKE_BRANCH = re.compile(
    r"""(?:==|!=)\s*["']({0})["']|["']({0})["']\s*(?:==|!=|in\b|not\s+in\b)|["'][^"'\n]*\b({0})\|""".format(
        "|".join(NAMES)
    )
)


def snakemake_branches(text: str) -> list[str]:
    return [
        f"{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if not line.lstrip().startswith("#") and SNAKEMAKE_BRANCH.search(line)
    ]


def test_no_code_outside_the_table_names_a_precision():
    python = [path for path in sorted(SRC.rglob("*.py")) if path != TABLE]
    python += sorted((ROOT / "workflow/scripts").glob("*.py"))
    found = {
        str(path.relative_to(ROOT)): lines
        for path in python
        if (lines := precision_branches(ast.parse(path.read_text(), str(path))))
    }
    found |= {
        str(path.relative_to(ROOT)): lines
        for path in workflow_files()
        if (lines := snakemake_branches(path.read_text()))
    }
    assert not found, f"read trtflow.precisions instead of naming a precision: {found}"


@pytest.mark.parametrize(
    "code",
    [
        'if precision == "int8":\n    pass\n',
        'x = "fp16" if p != "fp32" else None\n',
        'MODES = {"fp32": 0, "int8": 1}\n',
        'MODES = {"fp32": 0, "int8": 1, "fp8": 3}\n',
        'PRECISIONS = ("fp32", "fp16", "int8")\n',
        'table = engine["int8"]\n',
    ],
)
def test_a_precision_branch_is_found(code):
    assert precision_branches(ast.parse(code))


@pytest.mark.parametrize(
    "line",
    [
        '    qdq = wildcards.precision == "int8" and EXPLICIT_INT8',
        '        **({} if "int8" in PRECISIONS else {}),',
        '        precision="fp32|fp16|int8",',
    ],
)
def test_a_snakemake_branch_is_found(line):
    assert snakemake_branches(line)


def test_words_that_are_not_branches_pass():
    assert not precision_branches(ast.parse('log.info("building the int8 plan")\nquantize(mode="int8")\n'))
    assert not precision_branches(
        ast.parse('WORDS = {"fp32": "FLOAT", "float": "FLOAT", "fp16": "HALF", "half": "HALF"}')
    )
    assert not snakemake_branches('# calibration serves the "int8" engine\nLOGS / "engine/{model}{precision}.log",')


# -- the table's rows -------------------------------------------------------------------------------------------------


def test_each_row_is_consistent():
    for name, row in PRECISIONS.items():
        assert row.name == name
        assert TORCH_DTYPES[HEAD_DTYPES[row.head_dtype]].is_floating_point, name
        assert row.features_dtype in HEAD_DTYPES and row.bench_dtype in HEAD_DTYPES, name
        # a quantized precision is built from a Q/DQ graph calibration writes; a float one from the export
        assert row.features_graph in ((QDQ_GRAPH, precision_qdq_graph(name)) if row.calibrated else (EXPORTED_GRAPH,))
        assert row.quantized is None or row.quantized.name in TORCH_DTYPE_NAMES, name
        assert not row.implicit_calibration or row.calibrated, name
        assert row.verify_thresholds, name


def test_todays_rows():
    assert NAMES == ("fp32", "fp16", "int8", "fp8")
    assert DEFAULT_NAMES == ("fp32", "fp16", "int8")
    assert {name: row.head_dtype for name, row in PRECISIONS.items()} == {
        "fp32": "float32",
        "fp16": "float16",
        "int8": "float16",
        "fp8": "float16",
    }
    assert PRECISIONS["int8"].quantized.scale_rule() == "amax/127"
    assert PRECISIONS["fp8"].quantized.name == "float8_e4m3fn"
    assert PRECISIONS["fp8"].quantized.scale_rule() == "amax/448"
    assert dict(PRECISIONS["fp8"].min_compute_capability) == {"tensorrt_rtx": "8.9", "tensorrt": "8.9"}
    assert dict(PRECISIONS["fp8"].verify_thresholds) == {"max_map_drop_points": 0.3}
    assert [name for name in NAMES if PRECISIONS[name].calibrated] == ["int8", "fp8"]
    assert calibrated(["fp32", "int8"]) and calibrated(["fp8"]) and not calibrated(["fp32", "fp16"])
    assert features_graph("int8") == QDQ_GRAPH and features_graph("int8", implicit=True) == EXPORTED_GRAPH
    assert features_graph("fp8") == features_graph("fp8", implicit=True) == "features.fp8.qdq.onnx"
    assert features_graph("fp16", implicit=True) == EXPORTED_GRAPH
    with pytest.raises(ValueError, match="precision 'bf16': use one of fp32, fp16, int8, fp8"):
        precision("bf16")
