"""The `moba-ask` click group. `ask` is the default command; each command lives in agent/commands/.

`moba-ask PATH... QUESTION` runs `ask`: the group, like click-default-group, puts the default command's
name in front of arguments that do not start with a command name. Each command is imported by name in
its loader below, only when the group needs it (ask, chat, summarize, eval and calibrate import torch, the
first through the MoBA defaults of `moba.hf.MobaParams`; `pack`, `models` and `cache` do not need it).

Answers go to stdout, diagnostics to stderr. User errors are `click.ClickException`s: one
line, exit code 1, no traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import click


def _ask() -> click.Command:
    from agent.commands.ask import ask

    return ask


def _chat() -> click.Command:
    from agent.commands.chat import chat

    return chat


def _summarize() -> click.Command:
    from agent.commands.summarize import summarize

    return summarize


def _pack() -> click.Command:
    from agent.commands.pack import pack

    return pack


def _models() -> click.Command:
    from agent.commands.models import models

    return models


def _cache() -> click.Command:
    from agent.commands.cache import cache

    return cache


def _eval() -> click.Command:
    from agent.commands.eval import eval_cmd

    return eval_cmd


def _calibrate() -> click.Command:
    from agent.commands.calibrate import calibrate

    return calibrate


COMMANDS: dict[str, Callable[[], click.Command]] = {
    "ask": _ask, "chat": _chat, "summarize": _summarize, "pack": _pack, "models": _models, "cache": _cache,
    "eval": _eval, "calibrate": _calibrate,
}


SHARDED_COMMANDS = ("ask", "summarize", "eval")  # --gpus N: no stdin (chat would read it on every rank)


class DefaultGroup(click.Group):
    """A group of COMMANDS that runs `default_command` when the first argument is no command name."""

    default_command = "ask"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        lead = args[:2] if args[:1] == ["--gpus"] else args[:1] if args[:1] and args[0].startswith("--gpus=") else []
        rest = args[len(lead):]
        if rest and rest[0] not in COMMANDS and rest[0] not in (*ctx.help_option_names, "--version"):
            rest = [self.default_command, *rest]
        ctx.meta["command_args"] = rest
        return super().parse_args(ctx, lead + rest)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        load = COMMANDS.get(name)
        return load() if load else None


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moba-ask")
@click.option("--gpus", type=click.IntRange(min=1), default=1, metavar="N",
              help="Run the model tensor-parallel over N GPUs of this host (N ranks; the heads must divide by N).")
@click.pass_context
def cli(ctx: click.Context, gpus: int):
    """Ask questions about a whole codebase in one long context, with MoBA attention.

    \b
    Examples:
      moba-ask . "where is the config parsed?"
      moba-ask chat src/
      moba-ask summarize docs/*.pdf
      moba-ask pack . --json
      moba-ask --gpus 2 . "where is the config parsed?"
    """
    command = ctx.meta["command_args"][0] if ctx.meta["command_args"] else ""
    ranked = gpus > 1 or os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    if ranked and command not in SHARDED_COMMANDS:
        raise click.UsageError(f"tensor parallel (--gpus N, torchrun) runs {', '.join(SHARDED_COMMANDS)}, not "
                               f"{command}: run {command} as one process")
    if gpus > 1:
        from agent import parallel

        try:
            parallel.check_gpus(gpus)
        except parallel.ParallelError as e:
            raise click.ClickException(str(e)) from None
        ctx.exit(parallel.launch(gpus, ["-m", "agent.cli", *ctx.meta["command_args"]]))


def main() -> None:
    cli(prog_name="moba-ask")


if __name__ == "__main__":  # the ranks `--gpus N` starts run `python -m agent.cli`
    main()
