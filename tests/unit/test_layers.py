"""The house's layers, read from the source (AST, nothing imported): each module imports only its
own layer and those below it, modules import no cycle, and library code imports the package at
module level, not inside functions (a function-level import hides a dependency and a cycle)."""
import ast

from mpirun import REPO

# Top to bottom. A module belongs to the longest prefix that names it.
LAYERS = [
    ["cke_dist.cli"],                        # commands: parse, call the library, print
    ["cke_dist.train"],                      # the training job (its end-of-run sample uses serving)
    ["cke_dist.serving"],                    # requests in, tokens out
    ["cke_dist.parallel"],                   # how work is split, built on the model
    ["cke_dist.model"],                      # what is computed
    ["cke_dist.parallel.tensor_parallel"],   # the tp group a model is built with: comm only
    ["cke_dist.formats"],                    # files in and out
    ["cke_dist.comm"],                       # how bytes move
    ["cke_kernels"],                         # single-node kernels
]
# The package roots re-export names lazily (by string): they sit above everything.
ROOTS = {"cke_dist", "cke_dist.parallel"}
# Function-level imports of the package that stay, each with its reason.
ALLOWED_INNER = {
    ("cke_dist.comm.select", "cke_dist.comm.rdma"): "pyverbs is optional: rdma loads only where it is asked for",
}


def modules():
    out = {}
    for root, pkg in ((REPO / "cke_dist", "cke_dist"), (REPO / "kernels" / "cke_kernels", "cke_kernels")):
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def layer_of(mod):
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    return None if best is None else best[0]


def imports(mod, path, known):
    """[(imported module, inside a function?)] of the package's own modules."""
    tree = ast.parse(path.read_text())
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = []

    def add(name, inner):
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.append((name, inner))

    def visit(node, inner):
        for ch in ast.iter_child_nodes(node):
            now = inner or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, ast.Import):
                for a in ch.names:
                    add(a.name, now)
            elif isinstance(ch, ast.ImportFrom):
                base = ch.module or ""
                if ch.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - ch.level + 1]
                    base = ".".join(up + ([ch.module] if ch.module else []))
                for a in ch.names:
                    full = f"{base}.{a.name}"
                    add(full if full in known else base, now)
            visit(ch, now)
    visit(tree, False)
    return found


def graph():
    known = modules()
    return known, {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    known, _ = graph()
    assert [m for m in known if m not in ROOTS and layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_its_own():
    _, g = graph()
    bad = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
           for m, deps in g.items() if m not in ROOTS and layer_of(m) is not None for t, _ in deps
           if t not in ROOTS and layer_of(t) is not None and layer_of(t) < layer_of(m)]
    assert bad == []


def test_library_imports_the_package_at_module_level():
    _, g = graph()
    bad = [f"{m}: import of {t} inside a function" for m, deps in g.items()
           if not m.startswith("cke_dist.cli") and m not in ROOTS for t, inner in deps
           if inner and (m, t) not in ALLOWED_INNER and t != m]
    assert bad == []


def test_no_import_cycles():
    _, g = graph()
    edges = {m: {t for t, _ in deps if t != m and t not in ROOTS} for m, deps in g.items() if m not in ROOTS}
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            dfs(m)
    assert cycles == []
