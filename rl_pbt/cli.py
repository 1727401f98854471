"""Command-line checks that run before Hydra, so a misspelt option is one line, not a page."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rl_pbt.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_SIMPLE_CHOICE = re.compile(r"^[+~]?(?P<group>[A-Za-z_]+)=(?P<options>[\w.,-]*)$")


def fail(err: ConfigError) -> NoReturn:
    """Print one line and exit 2: the entry point's answer to bad input."""
    print(f"rl_pbt: error: {err}", file=sys.stderr)
    sys.exit(2)


def parse_path_and_options(
    args: list[str], readers: dict[str, Callable[[str], Any]], defaults: dict[str, Any],
    usage: str,
) -> tuple[Path, dict[str, Any]]:
    """``PATH key=value ...``, as the commands that work on a run folder take them.

    Args:
        args: the command line after the program name.
        readers: option name -> function that turns its text into a value (raises ValueError).
        defaults: option name -> value when the option is not given.
        usage: the line shown when the path is missing or doubled.
    """
    paths = [a for a in args if "=" not in a]
    if len(paths) != 1:
        raise ConfigError(f"usage: {usage}")
    options = dict(defaults)
    for arg in (a for a in args if "=" in a):
        key, _, value = arg.partition("=")
        if key not in readers:
            raise ConfigError(f"{key}: unknown option; choose from {', '.join(readers)}")
        try:
            options[key] = readers[key](value)
        except ValueError:
            raise ConfigError(f"{key}: cannot read {value!r}") from None
    return Path(paths[0]), options


def discard_empty_output_dir() -> None:
    """Remove the run folder Hydra made for a run that failed its checks.

    Hydra writes ``.hydra/`` and a log before the job starts; when the config is then rejected,
    the folder holds nothing of the run and would only look like one.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    bookkeeping = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= bookkeeping:
        shutil.rmtree(folder)
        # Hydra's default layout outputs/DATE/TIME: drop the DATE and outputs folders it made,
        # when empty. A folder the user named with hydra.run.dir is never touched above it.
        date, top = folder.parent, folder.parent.parent
        if top.name == "outputs":
            for parent in (date, top):
                if not any(parent.iterdir()):
                    parent.rmdir()


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_options(argv: list[str]) -> None:
    """Reject ``group=option`` overrides whose option does not exist, naming the closest.

    Only plain overrides and comma lists (sweeps) are checked; Hydra's richer override
    grammar is left to Hydra.
    """
    for arg in argv:
        match = _SIMPLE_CHOICE.match(arg)
        if not match or not (CONF_DIR / match["group"]).is_dir():
            continue
        group, known = match["group"], group_options(match["group"])
        for option in match["options"].split(","):
            if option and option != "null" and option not in known:
                close = difflib.get_close_matches(option, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                fail(ConfigError(
                    f"{group}={option}: no such option; {hint}choose from {', '.join(known)}"
                ))
