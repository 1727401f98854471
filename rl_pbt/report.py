"""``python -m rl_pbt.report RUN_DIR``: plots, report.md and exports for a finished run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rl_pbt.cli import fail
from rl_pbt.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    """Write the report files into RUN_DIR and list them."""
    parser = argparse.ArgumentParser(prog="python -m rl_pbt.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder (outputs/DATE/TIME)")
    args = parser.parse_args(argv)
    from rl_pbt.analysis.report import write_report

    try:
        report = write_report(args.run_dir)
    except ConfigError as err:
        fail(err)
    for path in report.paths():
        print(path)


if __name__ == "__main__":
    main()
