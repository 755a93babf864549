"""The typed functions behind `restora <command>`; restora.cli builds the parser from them.

Each function takes plain typed arguments (documented under "Args:"), does its work
through the library API, prints a human summary and returns an exit code.
"""

from restora.commands.checkpoints import generate, info, quantize
from restora.commands.experiments import demo, grid
from restora.commands.exporting import export
from restora.commands.planning import plan
from restora.commands.restoring import restore
from restora.commands.serving import serve
from restora.commands.training import eval, train

COMMANDS = {
    "quantize": quantize,
    "info": info,
    "generate": generate,
    "train": train,
    "eval": eval,
    "restore": restore,
    "export": export,
    "grid": grid,
    "plan": plan,
    "serve": serve,
    "demo": demo,
}

__all__ = ["COMMANDS"]
