"""The package's import graph: no circle between modules, and no module imports a higher layer.

Every prcl module's imports are read from its source (ast): module-level and function-level `import` and
`from … import` statements, relative ones resolved, and — in a module that calls importlib.import_module —
every string constant that names a prcl module (the lazy homes of `prcl` and the commands of `prcl`).
Nothing is imported to build the graph, so a module whose optional dependency is missing is still read.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prcl"

# Lowest first. A module may import its own layer (without a circle) and the layers below it.
LAYERS = (
    ("support", ("prcl.files",)),  # the CLI's file and error helpers: standard library only
    ("core", ("prcl.core", "prcl.backends")),  # the input contract, label forms, ops, and the backends
    ("public API", ("prcl", "prcl.functional", "prcl.nn", "prcl.distributed")),
    ("applications", ("prcl.encoders", "prcl.retrieval")),
    ("training", ("prcl.training", "prcl.integrations")),
    ("tools", ("prcl.testing", "prcl.tools")),
    ("entry point", ("prcl.__main__",)),
)
# The one import of a higher layer: contrastive_loss_step moved from prcl.encoders to prcl.training.step,
# and `from prcl.encoders import contrastive_loss_step` (the name users import) still answers, on first use.
ALLOWED_UPWARD = {("prcl.encoders", "prcl.training.step")}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name, modules):
    """The prcl module that `name` (a dotted name, perhaps module.attribute) lives in, or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def lazy_homes():
    """{public name: its module} of `prcl` itself (its _HOMES table, read from the source)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "_HOMES")
    return ast.literal_eval(table)


def _uses_of_root(tree, modules):
    """What `import prcl` brings in, by the attributes read from `prcl`: prcl.X.Y is the deepest module it
    names, a public name (prcl.fused_pair_bce) its home; a dunder (prcl.__path__) is the package's metadata."""
    homes, found = lazy_homes(), set()
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if not (isinstance(node, ast.Name) and node.id == "prcl" and chain):
            continue
        chain.reverse()
        if chain[0].startswith("__"):
            continue
        found.add(homes.get(chain[0]) or "prcl." + ".".join(chain))
    return found


def imports_of(name, path, modules):
    """{prcl module} that module `name` (source at `path`) imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "prcl" or alias.asname is None and alias.name.startswith("prcl."):
                    found.update(_uses_of_root(tree, modules))  # `import prcl.x` binds prcl too
                if alias.name != "prcl":
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
    if "import_module" in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}:
        found.update(n.value for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and n.value in modules and "." in n.value)
    resolved = {_resolve(f, modules) for f in found if f == "prcl" or f.startswith("prcl.")}
    return {m for m in resolved if m is not None and m != name}


def import_graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name):
    """Index in LAYERS of the longest prefix that names `name`'s layer."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best[0]


def upward_imports(graph):
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets
                  if layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_UPWARD)


def circles(graph):
    """The groups of modules that import each other (Tarjan's strongly connected components of more than one
    module), each as its sorted names joined by ", "."""
    graph = {a: {b for b in bs if (a, b) not in ALLOWED_UPWARD} for a, bs in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(", ".join(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for name in all_modules():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    found = upward_imports(import_graph())
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "modules that import each other, one group per line:\n" + "\n".join(found)


def test_function_level_and_relative_imports_are_read(tmp_path):
    """The reader sees an import inside a function and a relative one; a name imported from a package
    resolves to the submodule when it is one, else to the package."""
    modules = {"prcl": None, "prcl.core": None, "prcl.core.loss": None, "prcl.training": None,
               "prcl.training.step": None, "prcl.training.batching": None}
    source = tmp_path / "step.py"
    source.write_text("def f():\n    from prcl.core import loss\n    from .batching import Batch\n"
                      "import prcl.core\nfrom prcl.training import batch_loss\n")
    assert imports_of("prcl.training.step", source, modules) == {
        "prcl.core.loss", "prcl.training.batching", "prcl.core", "prcl.training"}


@pytest.mark.parametrize("low, high", [("prcl.core.loss", "prcl.training.step"),
                                       ("prcl.encoders.llm", "prcl.tools.gpu_check"),
                                       ("prcl.functional", "prcl.encoders")])
def test_an_added_upward_import_fails(low, high):
    graph = import_graph()
    before = upward_imports(graph)
    graph[low] = graph[low] | {high}
    added = sorted(set(upward_imports(graph)) - set(before))
    assert added == [f"{low} ({LAYERS[layer_of(low)][0]}) imports {high} ({LAYERS[layer_of(high)][0]})"]


def test_an_added_circle_fails():
    graph = import_graph()
    assert "prcl.training.batching" in graph["prcl.training.step"]
    before = circles(graph)
    graph["prcl.training.batching"] = graph["prcl.training.batching"] | {"prcl.training.step"}
    assert sorted(set(circles(graph)) - set(before)) == ["prcl.training.batching, prcl.training.step"]


def test_the_moved_training_step_keeps_its_first_name():
    import prcl.encoders
    import prcl.training.step

    assert prcl.encoders.contrastive_loss_step is prcl.training.step.contrastive_loss_step


MAX_FUNCTION_LINES = 80  # issue 24: short functions, docstring included; the kernels are exempt


def long_functions(root):
    """[(file, function, lines)] of every function over MAX_FUNCTION_LINES in root's Python files."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((str(path.relative_to(root)), node.name, lines))
    return found


def test_no_function_over_80_lines_outside_the_kernels():
    repo = PACKAGE.parent
    assert not [f for d in ("prcl", "tests", "benchmarks", "examples") for f in long_functions(repo / d)]


def test_a_long_function_is_found(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert long_functions(tmp_path) == [("m.py", "f", MAX_FUNCTION_LINES + 1)]
