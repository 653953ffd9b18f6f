"""Calibrated head weights: shipped JSON looked up by catalog name; a missing, corrupt or mismatched
file gives the uniform fallback and one clear note, never a traceback; a session states which it used."""

import json

import pytest
import torch

import ingest
from agent import headweights as hwm
from agent.config import AskConfig
from agent.session import Session
from tests.agent.fakes import FakeRuntime
from tests.ingest.fixtures import write_tree

MODEL = "smollm2-135m"  # a catalog name
GOOD = {"model": MODEL, "block_size": 256, "signal": "mass", "qa_policy": "moba", "layers": 30, "heads": 9,
        "weights": [[3, 1, 0.75], [20, 8, 0.25]], "identity": {"name": MODEL}}


LINES = {"weights": [[14, 4, 0.5], [17, 2, 0.5]], "top_n": 8, "max_lines": 1, "keep_share": 0.5}


@pytest.fixture
def heads_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(hwm, "HEADS_DIR", tmp_path)
    monkeypatch.setattr(hwm, "_NOTED", set())
    return tmp_path


def look(**kw):
    return hwm.for_model(MODEL, **{"layers": 30, "heads": 9, "block_size": 256, **kw})


def test_a_good_file_gives_its_weights(heads_dir):
    (heads_dir / f"{MODEL}.json").write_text(json.dumps(GOOD))
    hw, note = look()
    assert note == "" and hw.signal == "mass" and hw.meta["identity"] == {"name": MODEL}
    w = hw.matrix()
    assert w.shape == (30, 9) and w[3, 1] == 0.75 and w[20, 8] == 0.25 and w.sum() == 1.0
    assert hwm.parse(hw.to_json()) == hw


def test_a_lines_section_gives_line_heads_and_their_selection(heads_dir):
    (heads_dir / f"{MODEL}.json").write_text(json.dumps({**GOOD, "lines": {**LINES, "metrics": {"tasks": 9}}}))
    hw, note = look()
    assert note == "" and hw.lines.meta == {"metrics": {"tasks": 9}} and "lines" not in hw.meta
    lines = hw.line_matrix()
    assert lines[14, 4] == lines[17, 2] == 0.5 and lines.sum() == 1.0 and not torch.equal(lines, hw.matrix())
    assert hw.selection() == {"top_n": 8, "max_lines": 1, "keep_share": 0.5}
    assert hwm.parse(hw.to_json()) == hw
    plain = hwm.parse(GOOD)
    assert plain.lines is None and plain.selection() == {} and torch.equal(plain.line_matrix(), plain.matrix())


@pytest.mark.parametrize("content,needle", [
    (None, "no calibrated citation weights for smollm2-135m"),
    ("{not json", "not readable JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({**GOOD, "weights": "x"}), "malformed field"),
    (json.dumps({**GOOD, "weights": [[30, 0, 1.0]]}), "inside 30 layers x 9 heads, got [30, 0, 1.0]"),
    (json.dumps({**GOOD, "signal": "vibes"}), "unknown signal 'vibes'"),
    (json.dumps({**GOOD, "layers": 24}), "calibrated for 24 layers x 9 heads, the model has 30 x 9"),
    (json.dumps({**GOOD, "block_size": 128}), "calibrated at block size 128, this run uses 256"),
    (json.dumps({**GOOD, "lines": {"weights": [[0, 1, 1.0]]}}), "malformed lines field"),
    (json.dumps({**GOOD, "lines": {**LINES, "weights": [[0, 9, 1.0]]}}), "lines.weights must be [layer, head, w > 0]"),
    (json.dumps({**GOOD, "lines": {**LINES, "max_lines": 0}}), "lines needs top_n >= 1, max_lines >= 1"),
    (json.dumps({**GOOD, "lines": {**LINES, "keep_share": 2}}), "0 <= keep_share <= 1"),
    (json.dumps({**GOOD, "lines": {**LINES, "top_n": 8.7}}), "8.7 is not a whole number"),
], ids=["missing", "bad-json", "not-object", "bad-weights", "out-of-range", "bad-signal", "dims", "block-size",
        "lines-malformed", "lines-out-of-range", "lines-no-lines", "lines-keep", "lines-fraction"])
def test_unusable_files_fall_back_with_one_line(heads_dir, content, needle):
    if content is not None:
        (heads_dir / f"{MODEL}.json").write_text(content)
    hw, note = look()
    assert hw is None and needle in note and "\n" not in note
    assert note.endswith("citations weigh every attention head equally")


def test_a_model_outside_the_catalog_has_no_weights(heads_dir):
    (heads_dir / "my-model.json").write_text(json.dumps({**GOOD, "model": "my-model"}))
    hw, note = hwm.for_model("my-model", layers=30, heads=9, block_size=256)
    assert hw is None and "no calibrated citation weights for my-model" in note


def test_session_notes_the_fallback_once_and_says_so_in_stats(heads_dir, tmp_path, capsys):
    (heads_dir / f"{MODEL}.json").write_text("{corrupt")
    root = write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n"})
    rt = FakeRuntime(answers=["settings.py:1", "settings.py:1"])
    rt.name = MODEL
    pack = ingest.pack([root], rt.tokenizer, ingest.PackOptions())
    session = Session(rt, pack, AskConfig(no_cache=True, max_new_tokens=20))
    session.open()
    first, second = session.ask("What is the magic number?"), session.ask("And again?")
    err = capsys.readouterr().err
    assert err.count("moba-ask: note:") == 1 and "not readable JSON" in err and "Traceback" not in err
    assert first.stats["citation_weights"] == second.stats["citation_weights"] == "uniform"
    assert first.citations and session.head_weights is None


def _asked(heads_dir, root, doc, question):
    """(session, answer) of one question over `root` with `doc` as the model's weights file (2 layers x 4 heads)."""
    (heads_dir / f"{MODEL}.json").write_text(json.dumps({**GOOD, "layers": 2, "heads": 4, "block_size": 32, **doc}))
    rt = FakeRuntime(answers=["fine"], block_size=32)
    rt.name = MODEL
    pack = ingest.pack([root], rt.tokenizer, ingest.PackOptions())
    session = Session(rt, pack, AskConfig(no_cache=True, max_new_tokens=5, block_size=32))
    session.open = _open_with_heads(session, 4)
    session.open()
    return session, session.ask(question)


def test_session_uses_calibrated_weights(heads_dir, tmp_path, capsys):
    root = write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n"})
    _, answer = _asked(heads_dir, root, {"weights": [[1, 2, 1.0]]}, "What is the magic number?")
    assert answer.stats["citation_weights"] == "calibrated" and "note" not in capsys.readouterr().err
    want = torch.zeros(2, 4)
    want[1, 2] = 1.0
    assert torch.equal(answer.recorder.head_weights, want) and answer.recorder.per_head


def test_session_narrows_lines_by_the_line_heads_and_their_selection(heads_dir, tmp_path, monkeypatch):
    """With a lines section the recorder's key mass is weighted by the line heads and the citations use the
    calibrated selection; without it, the block weights and the defaults."""
    from agent import citations

    asked = []
    real = citations.from_routing
    monkeypatch.setattr(citations, "from_routing", lambda *a, **k: asked.append(k) or real(*a, **k))
    lines = {"weights": [[0, 3, 1.0]], "top_n": 2, "max_lines": 1, "keep_share": 0.0}
    root = write_tree(tmp_path / "repo", {f"m{i}.py": "".join(f"V{i}_{j} = {j}\n" for j in range(40)) for i in range(4)})
    for with_lines in (True, False):
        doc = {"weights": [[1, 2, 1.0]], **({"lines": lines} if with_lines else {})}
        session, answer = _asked(heads_dir, root, doc, "Where is V2_7 set?")
        want = torch.zeros(2, 4)
        want[(0, 3) if with_lines else (1, 2)] = 1.0
        assert torch.equal(answer.recorder.head_weights, want)
        sel = {"top_n": 2, "max_lines": 1, "keep_share": 0.0} if with_lines else \
            {"top_n": 8, "max_lines": 24, "keep_share": 0.3}
        assert session.cite_selection() == sel and sel in [{k: a.get(k) for k in sel} for a in asked]
        asked.clear()


def _open_with_heads(session, heads):
    """The fake engine's config names no query-head count; give it one before the lookup."""
    original = session.open

    def open_(progress=None, on_engine=None):
        real_make = session.runtime.make_engine

        def make(capacity, params=None):
            engine = real_make(capacity, params)
            engine.config = type("Cfg", (), dict(num_hidden_layers=2, num_attention_heads=heads))
            return engine

        session.runtime.make_engine = make
        original(progress, on_engine)

    return open_


def test_chosen_uniform_and_a_named_file(heads_dir, tmp_path):
    (heads_dir / f"{MODEL}.json").write_text(json.dumps(GOOD))
    dims = {"layers": 30, "heads": 9, "block_size": 256}
    assert hwm.chosen("uniform", MODEL, **dims) == (None, "")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**GOOD, "weights": [[5, 5, 1.0]]}))
    hw, note = hwm.chosen(str(mine), MODEL, **dims)
    assert note == "" and hw.weights == ((5, 5, 1.0),)
    with pytest.raises(hwm.WeightsError, match="calibrated for 30 layers x 9 heads, the model has 24 x 9"):
        hwm.chosen(str(mine), MODEL, **{**dims, "layers": 24})


def test_session_with_a_named_file_that_does_not_fit_is_a_setting_error(heads_dir, tmp_path):
    from agent.config import SettingError

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(GOOD))  # 30 x 9 heads; the fake model has 2 x 4
    root = write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n"})
    rt = FakeRuntime(answers=["fine"], block_size=32)
    rt.name = MODEL
    pack = ingest.pack([root], rt.tokenizer, ingest.PackOptions())
    session = Session(rt, pack, AskConfig(no_cache=True, max_new_tokens=5, head_weights=str(mine)))
    session.open = _open_with_heads(session, 4)
    with pytest.raises(SettingError, match="--head-weights: .*has 2 x 4"):
        session.open()


def test_weights_for_another_block_size_ship_beside_the_usual_file(heads_dir):
    (heads_dir / f"{MODEL}.json").write_text(json.dumps(GOOD))
    (heads_dir / f"{MODEL}@128.json").write_text(json.dumps({**GOOD, "block_size": 128, "weights": [[5, 2, 1.0]]}))
    at128, note = look(block_size=128)
    assert note == "" and at128.block_size == 128 and at128.weights == ((5, 2, 1.0),)
    assert look()[0].block_size == 256
    hw, note = look(block_size=512)
    assert hw is None and "calibrated at block size 256, this run uses 512" in note


def test_every_shipped_file_parses_and_its_name_gives_its_model_and_block_size():
    from agent.catalog import CATALOG

    shipped = sorted(hwm.HEADS_DIR.glob("*.json"))
    assert len(shipped) >= 2
    for path in shipped:
        hw = hwm.read(path)
        name, _, size = path.stem.partition("@")
        assert hw.model == name and name in CATALOG
        assert hwm.path_for(name, hw.block_size) == path and (not size or int(size) == hw.block_size)
