"""AskConfig: validation, "auto" attention, dense-layer parsing."""

import pytest

from agent.config import AskConfig, auto_threshold, parse_layers, resolve_attention


def test_auto_attention_is_dense_below_the_threshold_and_moba_from_it():
    cfg = AskConfig(block_size=256, top_k=6)
    assert cfg.attention == "auto" and auto_threshold(cfg) == 8 * 6 * 256
    assert resolve_attention(cfg, 12287).attention == "dense"
    assert resolve_attention(cfg, 12288).attention == "moba"
    assert auto_threshold(AskConfig(block_size=512, top_k=3)) == 8 * 3 * 512


def test_explicit_attention_is_kept_whatever_the_context():
    assert resolve_attention(AskConfig(attention="moba"), 10).attention == "moba"
    assert resolve_attention(AskConfig(attention="dense"), 10**6).attention == "dense"


@pytest.mark.parametrize("kw, message", [
    (dict(attention="flash"), "attention must be one of auto, moba, dense"),
    (dict(qa_policy="auto"), "qa_policy must be one of"),
    (dict(top_k=0), "block size and top-k must be >= 1"),
    (dict(max_new_tokens=0), "max new tokens >= 1"),
])
def test_bad_values_raise_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        AskConfig(**kw)


def test_parse_layers():
    assert parse_layers("last3") == (-3, -2, -1)
    assert parse_layers("0, 5,-1") == (0, 5, -1)
    assert parse_layers("") == ()
    with pytest.raises(ValueError, match="comma-separated integers or lastN"):
        parse_layers("a,b")
