"""Eval scorers and the BM25 baseline on hand-made cases."""

import math

import pytest

from agent.citations import Citation
from agent.evaluate import scoring
from agent.evaluate.bm25 import BM25, terms
from ingest import SourceMap

GOLD = "def load_config(path):\n    with open(path) as f:\n        data = f.read()\n    return parse(data)"
OTHER = "def save_config(path, data):\n    with open(path, 'w') as f:\n        f.write(dump(data))\n    return path"


def cite(path, a, b=None, score=0.5, source="routing"):
    return Citation(path, a, a if b is None else b, score, source)


def test_name_match_is_a_whole_identifier():
    assert scoring.names_identifier("It is `load_config` in src/cfg.py.", "load_config")
    assert scoring.names_identifier("load_config(path)", "load_config")
    assert not scoring.names_identifier("reload_config and load_config2", "load_config")
    assert not scoring.names_identifier("load config", "load_config")


def test_bleu_hand_values():
    assert scoring.sentence_bleu("a b c d", "a b c d") == pytest.approx(1.0)
    assert scoring.sentence_bleu("a b c d e", "a b c d") == pytest.approx(math.exp(1 - 5 / 4))  # brevity only
    smoothed_p4 = (1 / (2 * 5 / math.log(4))) / 1  # method4, first zero count, k=5, |hyp| = 4
    want = (3 / 4 * 2 / 3 * 1 / 2 * smoothed_p4) ** 0.25
    assert scoring.sentence_bleu("a b c d", "a b c x") == pytest.approx(want)
    assert scoring.sentence_bleu("a b c d", "x y z w") == 0.0
    assert scoring.sentence_bleu("a b c d", "") == 0.0


def test_first_code_block_strips_line_numbers_and_takes_the_first_function():
    answer = "It is load_config.\n```python\n 12| import os\n 13| def load_config(path):\n 14|     return 1\n" \
             " 15| \n 16| x = 2\n```\n```\ndef other(): pass\n```"
    block = scoring.first_code_block(answer)
    assert block.startswith("import os\ndef load_config(path):")
    assert scoring.first_function(block) == "def load_config(path):\n    return 1"
    assert scoring.first_code_block("no fences here") is None
    assert scoring.first_code_block("```\ndef cut(x):\n    return") == "def cut(x):\n    return"


def test_repoqa_rule_pass_and_fail():
    needles = [GOLD, OTHER]
    ok, bleu = scoring.repoqa_pass(f"Here:\n```python\n{GOLD}\n```", GOLD, needles)
    assert ok and bleu == pytest.approx(1.0)
    indented = "\n".join("    " + ln for ln in GOLD.split("\n"))
    assert scoring.repoqa_pass(f"```\n{indented}\n```", GOLD, needles)[0]
    wrong, bleu_other = scoring.repoqa_pass(f"```\n{OTHER}\n```", GOLD, needles)
    assert not wrong and bleu_other < 0.8
    half = "\n".join(GOLD.split("\n")[:2])
    assert scoring.repoqa_pass(f"```\n{half}\n```", GOLD, needles)[0] is False
    assert scoring.repoqa_pass("It is load_config, no code.", GOLD, needles) == (False, 0.0)


def test_repoqa_rule_needs_the_gold_to_be_the_best_needle():
    twin = GOLD.replace("parse(data)", "parse(data, strict=True)")
    ok, bleu = scoring.repoqa_pass(f"```\n{twin}\n```", GOLD, [GOLD, twin])
    assert bleu >= 0.8 and not ok  # close to the gold, but another needle matches better


def test_ranks_hits_and_mrr():
    cites = [cite("a.py", 3, source="text"), cite("b.py", 10), cite("a.py", 20), cite("c.py", 1)]
    assert scoring.file_ranking(cites) == ["a.py", "b.py", "c.py"]
    assert scoring.gold_rank(cites, "c.py") == 3 and scoring.gold_rank(cites, "z.py") is None
    assert scoring.hit_at(1, 1) == 1.0 and scoring.hit_at(3, 1) == 0.0 and scoring.hit_at(3, 3) == 1.0
    assert scoring.hit_at(None, 3) == 0.0
    assert scoring.reciprocal_rank(3) == pytest.approx(1 / 3) and scoring.reciprocal_rank(None) == 0.0


def test_line_precision_and_recall_use_the_gold_file_only():
    cites = [cite("a.py", 8, 12), cite("a.py", 30), cite("b.py", 10, 11)]
    p, r = scoring.line_scores(cites, "a.py", 10, 19)
    assert p == pytest.approx(3 / 6) and r == pytest.approx(3 / 10)
    assert scoring.line_scores(cites, "z.py", 1, 4) == (0.0, 0.0)
    assert scoring.line_scores([cite("a.py", 1, 100)], "a.py", 5, 5) == (pytest.approx(0.01), 1.0)


def test_bogus_citations_are_rechecked_against_the_source_map():
    sm = SourceMap.from_sections([(None, 0, [0], 0), ("a.py", 5, [0, 2, 4, 6], 2)], 20)
    cites = [cite("a.py", 1, 2), cite("a.py", 2, 3), cite("nope.py", 1), cite("a.py", 0), cite("a.py", 2, 1)]
    assert scoring.bogus_count(cites, sm) == 4
    assert scoring.bogus_count(cites[:1], sm) == 0


def test_mean_skips_none():
    assert scoring.mean([1, None, 0]) == 0.5 and scoring.mean([None]) is None


def test_bm25_terms_split_identifiers():
    assert terms("parse_args HTTPServer x2") == ["parse_args", "parse", "args", "httpserver", "http", "server",
                                                "x2", "x", "2"]


def test_bm25_ranks_the_obvious_file_first():
    docs = {
        "net/http.py": "def send_request(url, timeout):\n    '''Send an HTTP request with retries.'''\n",
        "db/store.py": "def save_record(table, row):\n    cursor.execute('INSERT INTO table')\n",
        "util/text.py": "def slugify(title):\n    return title.lower().replace(' ', '-')\n",
    }
    bm = BM25(docs)
    assert bm.rank("Which function inserts a row into a database table?")[0] == "db/store.py"
    assert bm.rank("make a url slug from a title")[0] == "util/text.py"
    assert bm.rank("where is send_request defined")[0] == "net/http.py"
    assert bm.scores("nothing matches zzz") == {name: 0.0 for name in docs}
