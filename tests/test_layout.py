"""The package's shape: imports point one way (no cycles between cee_gen modules, lazy imports inside
functions included, type-only imports excluded) and no module grows past ~400 lines unheard of."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cee_gen"
LONG_OK = "long on purpose"  # a module over 400 lines says why in its docstring with these words


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """cee_gen modules `path` imports at run time (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for b in node.body for n in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cee_gen")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("cee_gen"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from cee_gen.x import module`
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = {d for d in _imports(path, name) if d in files and d != name}
        # importing a.b.c runs a and a.b too; a package's own __init__ imports its submodules
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cee_gen_modules_import_one_way_without_cycles():
    graph = _graph()
    assert len(graph) > 40, "the package was not found"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_model_layer_knows_no_exit_policy_fill_timing_or_engine():
    graph = _graph()
    for low in ("cee_gen.model", "cee_gen.cache", "cee_gen.rope"):
        assert not {d for d in graph[low] if d.startswith(("cee_gen.engine", "cee_gen.exits",
                                                          "cee_gen.kv_fill", "cee_gen.generate"))}, low


def test_no_module_is_over_400_lines_without_saying_why():
    long = [p for p in PKG.rglob("*.py") if len(p.read_text().splitlines()) > 400
            and LONG_OK not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not long, long
