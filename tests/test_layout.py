"""The package's layout rules (issue 28), read from the source: no import cycle between its modules, counting the
imports made inside functions (so a function-local import never hides a cycle; the ones there keep the CLI's start
fast), and no private name imported from another module."""

import ast
from pathlib import Path

import sra_distill

ROOT = Path(sra_distill.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("sra_distill", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(module, name) for every `from sra_distill... import name` and `import sra_distill...` in the file, at any
    depth; module is the imported module (a submodule when the name is one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sra_distill"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule if submodule in modules else node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("sra_distill")]
    return found


def test_no_import_cycle_even_through_function_local_imports():
    modules = _modules()
    graph = {name: {target for target, _ in _imports(path, modules) if target in modules and target != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(stack[stack.index(target):] + [target])
            if target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    assert len(modules) > 40  # the whole package was read
    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    private = [f"{name} imports {target}.{imported}" for name, path in modules.items()
               for target, imported in _imports(path, modules) if imported.startswith("_")]
    assert private == []
