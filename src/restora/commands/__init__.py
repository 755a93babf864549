"""The typed functions behind `restora <command>`; restora.cli builds the parser from them.

Each function takes plain typed arguments (documented under "Args:"), does its work
through the library API, prints a human summary and returns an exit code.
"""

from ..plan_choice import plan
from ..serve.command import serve
from .checkpoints import generate, info, quantize
from .experiments import demo, grid
from .exporting import export
from .restoring import restore
from .training import eval, train

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
