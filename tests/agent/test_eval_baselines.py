"""The no-model baselines: function/class/module chunks and BM25 over them, on a hand-made repository."""

from dataclasses import dataclass

from agent.evaluate.baselines import chunks_of, task_baselines

TEXTS = {
    "net.py": ('"""Networking."""\nTIMEOUT = 5\n\n\ndef send_request(url):\n    """Send an HTTP request."""\n'
               "    return url\n\n\nclass Client:\n    retries = 3\n\n    def fetch(self, url):\n"
               "        return send_request(url)\n"),
    "db.py": "def save_record(table, row):\n    cursor.execute('INSERT INTO table')\n    return row\n",
    "README.md": "# words\n",
}


@dataclass(frozen=True)
class T:
    id: str
    question: str
    path: str
    start_line: int
    end_line: int


def test_chunks_are_functions_class_headers_and_module_lines():
    got = {(c.path, min(c.lines), max(c.lines), len(c.lines)) for c in chunks_of(TEXTS)}
    assert ("net.py", 5, 7, 3) in got  # send_request
    assert ("net.py", 10, 12, 3) in got  # class Client up to its first method
    assert ("net.py", 13, 14, 2) in got  # the method
    assert ("net.py", 1, 2, 2) in got  # non-blank module lines outside top-level defs
    assert ("db.py", 1, 3, 3) in got and ("README.md", 1, 2, 2) in got


def test_bm25_over_chunks_hits_the_right_function_and_misses_otherwise():
    tasks = [T("a", "Which function inserts a row into a table?", "db.py", 1, 3),
             T("b", "Which function inserts a row into a table?", "net.py", 5, 7),
             T("c", "Which function calls `send_request`?", "net.py", 13, 14)]
    b = task_baselines(TEXTS, tasks, seed=0)
    assert (b["a"]["bm25_rank"], b["a"]["bm25_fn_top1"], b["a"]["bm25_fn_top3"]) == (1, 1.0, 1.0)
    assert (b["b"]["bm25_fn_top1"], b["b"]["bm25_fn_top3"]) == (0.0, 0.0)
    assert b["c"]["bm25_fn_top3"] == 1.0 and b["c"]["random_file"] in TEXTS
    assert task_baselines(TEXTS, tasks, seed=0) == b
