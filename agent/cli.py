"""The `moba-ask` click group. `ask` is the default command; each command lives in agent/commands/.

Answers go to stdout, diagnostics to stderr. User errors are `click.ClickException`s: one
line, exit code 1, no traceback.
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "ask": "agent.commands.ask:ask",
    "chat": "agent.commands.chat:chat",
    "summarize": "agent.commands.summarize:summarize",
    "pack": "agent.commands.pack:pack",
    "models": "agent.commands.models:models",
    "cache": "agent.commands.cache:cache",
    "eval": "agent.commands.eval:eval_cmd",
    "calibrate": "agent.commands.calibrate:calibrate",
}


class DefaultGroup(click.Group):
    """A group that runs `ask` when the first argument is not a command name."""

    def parse_args(self, ctx, args):
        if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = ["ask", *args]
        return super().parse_args(ctx, args)

    def list_commands(self, ctx):
        return [name for name in COMMANDS if _load(name) is not None]

    def get_command(self, ctx, name):
        return _load(name)


def _load(name: str):
    target = COMMANDS.get(name)
    if target is None:
        return None
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moba-ask")
def cli():
    """Ask questions about a whole codebase in one long context, with MoBA attention.

    \b
    Examples:
      moba-ask . "where is the config parsed?"
      moba-ask chat src/
      moba-ask summarize docs/*.pdf
      moba-ask pack . --json
    """


def main() -> None:
    cli(prog_name="moba-ask")
