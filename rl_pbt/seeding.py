"""RLlib's torch seeding without importing torch's compiler.

With a seed, RLlib's set-up calls ``torch.use_deterministic_algorithms(True)`` (CPU torch), which
imports ``torch._inductor`` (and with it TorchDynamo and sympy: 1.1 s of a trial's start here)
only to set inductor's own ``deterministic`` flag. Inductor reads that flag from
``TORCHINDUCTOR_DETERMINISTIC`` when it is first imported, so within
:func:`deterministic_without_compiler` the call sets torch's flag and hands inductor's to that
variable (or to inductor itself if it is already imported): the same state either way, without
the import for a trial that never compiles.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Inductor's module, and the variable it takes its ``deterministic`` default from.
_INDUCTOR_CONFIG = "torch._inductor.config"
_INDUCTOR_DETERMINISTIC = "TORCHINDUCTOR_DETERMINISTIC"


#: torch's own function, taken at import: what the block restores (also after nested blocks).
_ORIGINAL = torch.use_deterministic_algorithms


def _use_deterministic_algorithms(mode: bool, *, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, with inductor's flag handed to the variable
    while inductor is not imported; torch's own function once it is."""
    if _INDUCTOR_CONFIG in sys.modules:
        _ORIGINAL(mode, warn_only=warn_only)
        return
    os.environ[_INDUCTOR_DETERMINISTIC] = "1" if mode else "0"
    torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


@contextmanager
def deterministic_without_compiler() -> Iterator[None]:
    """Within the block, ``torch.use_deterministic_algorithms`` leaves inductor unimported.

    The variable stays set after the block, as inductor's flag would have (this process's and
    its child processes' inductor read it; Ray's actors do not inherit it).
    """
    torch.use_deterministic_algorithms = _use_deterministic_algorithms
    try:
        yield
    finally:
        torch.use_deterministic_algorithms = _ORIGINAL
