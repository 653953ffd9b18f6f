"""AskConfig: validation, "auto" attention, dense-layer parsing, the MobaParams it stands for."""

import pytest

from agent.config import (
    DENSE_LAYERS_CPU,
    AskConfig,
    SettingError,
    auto_threshold,
    params_for,
    parse_layers,
    settle,
)
from moba.hf import MobaParams


def test_auto_attention_is_dense_below_32k_tokens_on_cpu_and_64k_on_a_gpu():
    cfg = AskConfig(block_size=256, top_k=6)
    assert cfg.attention == "auto" and auto_threshold(cfg, "cpu") == 32_768
    assert settle(cfg, 32_767, "cpu").attention == "dense" and settle(cfg, 32_768, "cpu").attention == "moba"
    for device in ("cuda", "cuda:1"):
        assert auto_threshold(cfg, device) == 65_536
        assert settle(cfg, 65_535, device).attention == "dense"
        assert settle(cfg, 65_536, device).attention == "moba"
    small = AskConfig(block_size=4, top_k=2)  # small blocks do not lower the floor
    assert auto_threshold(small, "cpu") == 32_768 and auto_threshold(small, "cuda") == 65_536


def test_auto_attention_stays_dense_where_moba_would_attend_an_eighth_of_the_context():
    big = AskConfig(block_size=4096, top_k=12)
    assert auto_threshold(big, "cpu") == auto_threshold(big, "cuda") == 8 * 12 * 4096
    assert settle(big, 8 * 12 * 4096 - 1, "cuda").attention == "dense"
    assert settle(big, 8 * 12 * 4096, "cuda").attention == "moba"


def test_explicit_attention_is_kept_whatever_the_context():
    assert settle(AskConfig(attention="moba"), 10, "cpu").attention == "moba"
    assert settle(AskConfig(attention="dense"), 10**6, "cuda").attention == "dense"


@pytest.mark.parametrize("kw, message", [
    (dict(attention="flash"), "attention must be one of auto, moba, dense"),
    (dict(qa_policy="auto"), "qa_policy must be one of"),
    (dict(top_k=0), "block size and top-k must be >= 1"),
    (dict(max_new_tokens=0), "max new tokens >= 1"),
])
def test_bad_values_raise_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        AskConfig(**kw)


def test_dense_layers_default_by_device_unless_given():
    assert AskConfig().dense_layers is None
    assert settle(AskConfig(), 100, "cpu").dense_layers == DENSE_LAYERS_CPU == (-3, -2, -1)
    assert settle(AskConfig(), 100, "cuda:1").dense_layers == ()
    assert settle(AskConfig(dense_layers=()), 100, "cpu").dense_layers == ()
    assert settle(AskConfig(dense_layers=(0,)), 100, "cuda").dense_layers == (0,)


def test_parse_layers():
    assert parse_layers("last3") == (-3, -2, -1)
    assert parse_layers("none") == () and parse_layers(None) is None
    assert parse_layers("0, 5,-1") == (0, 5, -1)
    assert parse_layers("") == ()
    with pytest.raises(ValueError, match="comma-separated integers or lastN"):
        parse_layers("a,b")


def test_moba_settings_have_one_home():
    assert params_for(AskConfig(), 4) == MobaParams()  # every default from MobaParams; dense layers none
    assert params_for(AskConfig(attention="dense", top_k=3), 3) == MobaParams(top_k=3, dense_layers=(0, 1, 2))
    with pytest.raises(ValueError, match="local blocks must be >= 0 and below top-k"):
        MobaParams(top_k=2, local_blocks=2)
    with pytest.raises(SettingError, match="local blocks must be >= 0 and below top-k"):
        AskConfig(top_k=2, local_blocks=2)
