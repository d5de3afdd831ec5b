"""Each shared fact is defined in one module of src/trtflow (issue 22): the dtype vocabulary, the features network's
output names, the box colours, plugins.ptx_arch's rule. A second copy would drift from the first unnoticed, so the
copies are found by what a definition looks like in the syntax tree, whatever it is named."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src/trtflow"

# Spellings of a data type: TensorRT DataType names, numpy / torch names, the engine inspector's and precisions' words
DTYPE_WORDS = {
    *("float", "half", "bf16", "int8", "uint8", "int32", "int64", "bool", "fp8", "int4", "fp4"),
    *("float32", "float16", "bfloat16", "bool_", "fp32", "fp16"),
}
RPN_OUTPUT_WORDS = {"objectness", "deltas", "objectness_", "deltas_"}
BOX_COLORS = {"#d73027", "#1a9850"}  # the deployed and the reference boxes' red and green
BOX_COLOR_TRIPLES = {(215, 48, 39), (39, 48, 215), (26, 152, 80), (80, 152, 26)}  # the same as RGB and BGR


def dtype_like(node) -> bool:
    """A data type's spelling: "HALF", "fp16", torch.float16, np.float16, trt.float16 (one element of a tuple)."""
    if isinstance(node, ast.Tuple):
        return any(dtype_like(element) for element in node.elts)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.lower() in DTYPE_WORDS
    return isinstance(node, ast.Attribute) and node.attr in DTYPE_WORDS


def is_dtype_table(node) -> bool:
    """A dict literal with two or more entries from a data type's spelling to another spelling."""
    return (
        isinstance(node, ast.Dict) and sum(dtype_like(k) and dtype_like(v) for k, v in zip(node.keys, node.values)) > 1
    )


def is_rpn_output_name(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in RPN_OUTPUT_WORDS


def is_box_color(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in BOX_COLORS
    return isinstance(node, ast.Tuple) and tuple(getattr(e, "value", None) for e in node.elts) in BOX_COLOR_TRIPLES


def is_ptx_arch_rule(node) -> bool:
    """A comparison of a ptx_arch with min(...) of the archs."""
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]
    return any("ptx_arch" in ast.unparse(o) for o in operands) and any(
        isinstance(o, ast.Call) and ast.unparse(o.func) == "min" for o in operands
    )


def definitions(predicate) -> list[str]:
    """'module:line' of every node of src/trtflow for which `predicate` holds."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if predicate(node):
                found.append(f"{path.relative_to(SRC).as_posix()}:{node.lineno}")
    return found


@pytest.mark.parametrize(
    "predicate, home",
    [
        (is_dtype_table, "backend/dtypes.py"),
        (is_rpn_output_name, "common/model.py"),
        (is_box_color, "run/drawing.py"),
        (is_ptx_arch_rule, "common/plugins.py"),
    ],
    ids=["dtype tables", "features output names", "box colours", "ptx_arch rule"],
)
def test_each_fact_is_defined_in_one_module(predicate, home):
    found = definitions(predicate)
    assert found, f"no definition found: the search for {predicate.__name__} no longer matches its home {home}"
    assert {place.split(":")[0] for place in found} == {home}, f"defined in {found}; define it in {home} only"


def test_the_ptx_arch_rule_is_one_comparison():
    assert len(definitions(is_ptx_arch_rule)) == 1
