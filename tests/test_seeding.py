"""RLlib's torch seeding sets the same determinism flags without importing torch's compiler."""

from __future__ import annotations

import os
import subprocess
import sys


def test_flags_are_set_and_inductor_gets_its_own_when_imported():
    code = """
import os, sys, torch
from rl_pbt.seeding import deterministic_without_compiler
original = torch.use_deterministic_algorithms
with deterministic_without_compiler():
    torch.use_deterministic_algorithms(True)
restored = torch.use_deterministic_algorithms is original
unimported = "torch._inductor.config" not in sys.modules and "torch._dynamo" not in sys.modules
import torch._inductor.config as inductor
print(torch.are_deterministic_algorithms_enabled(), unimported, restored, inductor.deterministic)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_without_inductor_variable())
    assert out.stdout.split() == ["True", "True", "True", "True"]


def test_an_imported_inductor_gets_the_flag_directly():
    code = """
import torch, torch._inductor.config as inductor
from rl_pbt.seeding import deterministic_without_compiler
with deterministic_without_compiler():
    torch.use_deterministic_algorithms(True)
first = inductor.deterministic
with deterministic_without_compiler():
    torch.use_deterministic_algorithms(False)
print(first, inductor.deterministic, torch.are_deterministic_algorithms_enabled())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_without_inductor_variable())
    assert out.stdout.split() == ["True", "False", "False"]


def _without_inductor_variable() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_DETERMINISTIC"}
