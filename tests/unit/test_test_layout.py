"""The layout of tests/ itself (docs/testing.md): test files in folders by kind, programs run as other
processes in files ruff checks, one home for shared helpers, no test importing another."""
import ast
import re

from mpirun import REPO

TESTS = REPO / "tests"
KINDS = {"unit", "integration", "cluster"}
PROGRAM_DIRS = {"ranks", "programs"}


def _py(folder):
    return sorted((TESTS / folder).glob("*.py"))


def test_test_files_live_in_a_folder_of_their_kind():
    stray = [p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")
             if p.parent.name not in KINDS or p.parent.parent != TESTS]
    assert stray == [], f"test files outside tests/{{{','.join(sorted(KINDS))}}}/: {stray}"
    assert {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))} \
        == KINDS | PROGRAM_DIRS | {"helpers"}


def test_programs_are_not_collected_and_each_is_used():
    """ranks/ (run under mpiexec) and programs/ (one process) hold no test_ files, and every program is
    named by some test, so none is left behind when its test goes."""
    tests_text = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    for folder in PROGRAM_DIRS:
        for p in _py(folder):
            assert not p.name.startswith("test_"), f"{p}: programs are not collected; drop the test_ prefix"
            if folder == "ranks":
                assert p.name.endswith("_mpi.py"), f"{p}: programs run under mpiexec are named *_mpi.py"
            assert f'"{p.name}"' in tests_text, f"{p.name} is run by no test"


def test_tests_do_not_import_each_other():
    """Shared code lives in tests/helpers (on pytest's pythonpath), never in another test file."""
    bad = []
    for p in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{p.relative_to(TESTS)} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert bad == []


def _string_value(node, assigned):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.Name) and node.id in assigned:
        return _string_value(assigned[node.id], assigned)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left, assigned), _string_value(node.right, assigned)
        return None if left is None or right is None else left + right
    return None


def test_no_program_hides_in_a_python_c_string():
    """`python -c` only for a line or two; a longer program is a file in ranks/ or programs/, where ruff
    sees it. (README blocks run as they are: they are the README's, not ours; test_repo_root's program
    must be -c, since the point is the current directory on sys.path.)"""
    long = []
    for p in TESTS.rglob("test_*.py"):
        if p.name == "test_repo_root.py":
            continue
        tree = ast.parse(p.read_text())
        assigned = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            items = node.elts if isinstance(node, ast.List) else node.args if isinstance(node, ast.Call) else []
            for a, b in zip(items, items[1:]):
                if isinstance(a, ast.Constant) and a.value == "-c":
                    code = _string_value(b, assigned)
                    if code is not None and len(re.split(r"\n|; ", code.strip())) > 4:
                        long.append(f"{p.relative_to(TESTS)}:{b.lineno}")
    assert long == [], f"programs in python -c strings: {long}"


def test_every_import_in_tests_resolves():
    """A renamed helper or program leaves no import behind (serving_mpi.py once imported tp_mpi, a name gone
    with the move): each module a test file or program imports is installed, a helper, or beside it."""
    import importlib.util
    import sys
    missing = []
    for p in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name in sys.modules or (p.parent / f"{name}.py").is_file() \
                        or (TESTS / "helpers" / f"{name}.py").is_file():
                    continue
                if importlib.util.find_spec(name) is None:
                    missing.append(f"{p.relative_to(TESTS)}:{node.lineno} imports {name}")
    assert missing == [], missing
