"""The attention config spec language: names, keys, aliases, bad specs, and fields that do not exist yet."""

import dataclasses

import pytest

from agent.config import AskConfig, parse_layers
from agent.evaluate import configs
from agent.evaluate.configs import parse_specs

BASE = AskConfig(block_size=64, top_k=4, sink_blocks=2, qa_policy="moba")


def applied(text):
    return [(s.name, s.apply(BASE)) for s in parse_specs(text)]


def test_the_documented_list_parses_to_the_fields():
    got = dict(applied("dense,moba,moba:qa=dense,moba:qa=dense+dense=last3,moba:block=512+topk=3"))
    assert list(got) == ["dense", "moba", "moba:qa=dense", "moba:qa=dense+dense=last3", "moba:block=512+topk=3"]
    assert got["dense"].attention == "dense" and got["moba"].attention == "moba"
    assert (got["moba"].block_size, got["moba"].top_k, got["moba"].sink_blocks, got["moba"].dense_layers) == (64, 4, 2, ())
    assert got["moba:qa=dense"].qa_policy == "dense" and got["moba:qa=dense"].dense_layers == ()
    assert got["moba:qa=dense+dense=last3"].dense_layers == (-3, -2, -1)
    assert (got["moba:block=512+topk=3"].block_size, got["moba:block=512+topk=3"].top_k) == (512, 3)
    assert all(c.no_cache for c in got.values())


def test_alias_sinks_and_layer_lists_with_commas():
    got = dict(applied("moba-hybrid,moba:dense=first2,last2,dense,moba:sinks=0+dense=0,5"))
    assert list(got) == ["moba-hybrid", "moba:dense=first2,last2", "dense", "moba:sinks=0+dense=0,5"]
    assert got["moba-hybrid"].dense_layers == (-3, -2, -1)
    assert got["moba:dense=first2,last2"].dense_layers == (0, 1, -2, -1)
    assert got["moba:sinks=0+dense=0,5"].sink_blocks == 0 and got["moba:sinks=0+dense=0,5"].dense_layers == (0, 5)


def test_parse_layers_first_last_and_mixes():
    assert parse_layers("first2") == (0, 1) and parse_layers("first2,last2") == (0, 1, -2, -1)
    assert parse_layers("last3") == (-3, -2, -1) and parse_layers("none") == ()
    with pytest.raises(ValueError, match="lastN/firstN"):
        parse_layers("middle2")


@pytest.mark.parametrize("text, message", [
    ("flash", "unknown attention config 'flash'"),
    ("dense:qa=dense", "unknown attention config"),
    ("moba:qa=auto", "qa_policy must be one of"),
    ("moba:topk=0", "block size and top-k must be >= 1"),
    ("moba:topk=three", "top_k must be a number"),
    ("moba:topk", "'topk' is not key=value"),
    ("moba:topk=3+topk=4", "topk given twice"),
    ("moba:warp=2", "unknown key 'warp'"),
    ("moba:model=x", "unknown key 'model'"),
    ("moba:dense=middle", "dense layers must be"),
    ("dense,moba,dense", "'dense' listed twice"),
    (" , ", "no attention config"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_specs(text)


def test_keys_resolve_against_the_fields_of_askconfig_when_parsed(monkeypatch):
    names = {f.name for f in dataclasses.fields(AskConfig)}
    for key in ("local", "sub"):
        if configs.KEYS[key] not in names:
            with pytest.raises(ValueError, match=rf"unknown {key} \(AskConfig\.{configs.KEYS[key]} does not exist yet\)"):
                parse_specs(f"moba:{key}=1")

    @dataclasses.dataclass(frozen=True)
    class Wider(AskConfig):
        local_blocks: int = 0
        center_keys: bool = False

    monkeypatch.setattr(configs, "AskConfig", Wider)
    (spec,) = parse_specs("moba:local=2+center_keys=on")
    assert spec.overrides == (("local_blocks", 2), ("center_keys", True))
    assert spec.apply(Wider()).local_blocks == 2
    with pytest.raises(ValueError, match="center_keys must be on or off"):
        parse_specs("moba:center_keys=maybe")
