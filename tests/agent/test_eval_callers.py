"""The caller family's AST rule on hand-made modules: one calling function, in another file, named once."""

import ast

from agent.evaluate.callers import caller_candidates


def found(files: dict[str, str]) -> set[tuple[str, str, str, int, int]]:
    trees = {p: ast.parse(t) for p, t in files.items()}
    return {(c.callee, c.name, c.path, c.line, c.end_line) for c in caller_candidates(trees)}


def test_one_caller_in_another_file_by_name_or_attribute():
    files = {
        "a.py": "def parse(x):\n    return x\n\n\nclass Box:\n    def pack(self):\n        return 1\n",
        "b.py": "import a\n\n\ndef load(p):\n    y = a.parse(p)\n    return y\n\n\ndef ship(b):\n    return b.pack()\n",
    }
    assert found(files) == {("parse", "load", "b.py", 4, 6), ("pack", "ship", "b.py", 9, 10)}


def test_a_second_caller_a_same_file_caller_or_a_module_level_call_disqualifies():
    two = {"a.py": "def parse(x):\n    return x\n", "b.py": "def f():\n    parse(1)\n\n\ndef g():\n    parse(2)\n"}
    same = {"a.py": "def parse(x):\n    return x\n\n\ndef f():\n    return parse(1)\n", "b.py": "x = 1\n"}
    top = {"a.py": "def parse(x):\n    return x\n", "b.py": "def f():\n    parse(1)\n\n\nparse(2)\n"}
    assert found(two) == found(same) == found(top) == set()


def test_ambiguous_names_never_qualify():
    callee_twice = {"a.py": "def parse(x):\n    return x\n", "c.py": "def parse(y):\n    return y\n",
                    "b.py": "def f():\n    parse(1)\n"}
    caller_twice = {"a.py": "def parse(x):\n    return x\n", "b.py": "def f():\n    parse(1)\n",
                    "c.py": "def f():\n    return 2\n"}
    dunder = {"a.py": "def parse(x):\n    return x\n", "b.py": "class C:\n    def __init__(self):\n        parse(1)\n"}
    assert found(callee_twice) == found(caller_twice) == found(dunder) == set()


def test_the_innermost_function_is_the_caller_and_decorators_belong_outside():
    files = {
        "a.py": "def parse(x):\n    return x\n\n\ndef deco(f):\n    return f\n",
        "b.py": "def outer():\n    def inner():\n        return parse(1)\n    return inner\n\n\n"
                "def wrap():\n    @deco(1)\n    def g():\n        return 0\n    return g\n",
    }
    assert found(files) == {("parse", "inner", "b.py", 2, 3), ("deco", "wrap", "b.py", 7, 11)}


def test_the_callee_may_be_defined_outside_the_context_but_only_once_in_the_repository():
    packed = {"b.py": "def load(p):\n    return parse(p)\n"}
    repository = {**packed, "a.py": "def parse(x):\n    return x\n"}
    trees = {p: ast.parse(t) for p, t in packed.items()}
    repo_trees = {p: ast.parse(t) for p, t in repository.items()}
    assert [(c.callee, c.callee_path, c.name) for c in caller_candidates(trees, repo_trees)] == [("parse", "a.py", "load")]
    assert caller_candidates(trees) == []  # parse is defined nowhere in the packed files
    twice = {**repo_trees, "c.py": ast.parse("class P:\n    def parse(self):\n        return 1\n")}
    assert caller_candidates(trees, twice) == []
