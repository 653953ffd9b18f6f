"""`python -m tests.agent.fakecli ARGS...`: the moba-ask CLI in its own process on the fake runtime
(tests/agent/fakes.py), for tests that need several processes or a kill -9.

$FAKECLI_STALL_SAVE (seconds): after the context cache's safetensors file is written, touch
$FAKECLI_MARKER (when set) and sleep that long, so that another process can race or kill the writer.
"""

import os
import time

import safetensors.torch

import agent.runtime
from agent.cli import main
from tests.agent.fakes import FakeRuntime

ANSWER = "MAGIC_NUMBER is 7391046 (src/settings.py:4)."


def _stalling(save_file, seconds: float, marker: str | None):
    def save(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if marker:
            open(marker, "w").close()
        time.sleep(seconds)
    return save


if __name__ == "__main__":
    runtime = FakeRuntime(answers=[ANSWER] * 4, block_size=64, max_positions=100_000)
    agent.runtime.load_runtime = lambda cfg: runtime
    stall = float(os.environ.get("FAKECLI_STALL_SAVE") or 0)
    if stall:
        safetensors.torch.save_file = _stalling(safetensors.torch.save_file, stall, os.environ.get("FAKECLI_MARKER"))
    main()
