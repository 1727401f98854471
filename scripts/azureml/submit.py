"""Submit rl_pbt's multi-node PBT job (``job.yml`` beside this file) and print its studio URL.

    python scripts/azureml/submit.py --config config.json --compute cpu-cluster --instances 3 \\
        -- env=acrobot population=8

The workspace is a ``config.json`` (downloaded from the workspace's page in the Azure portal or
studio) or ``--subscription``, ``--resource-group`` and ``--workspace``. Sign-in goes through
``DefaultAzureCredential`` (``az login``, environment variables, a managed identity). Everything
after ``--`` is passed to ``python -m rl_pbt`` on the head node, after the job's own options
(``resources=cluster resources.address=auto tracking=azureml``), so it can override them.
Needs the ``azureml`` extra: ``pip install -e ".[azureml]"``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

JOB_FILE = Path(__file__).resolve().parent / "job.yml"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_argument_group("workspace: --config, or all three of the others")
    where.add_argument("--config", type=Path, help="the workspace's config.json")
    where.add_argument("--subscription", help="Azure subscription id")
    where.add_argument("--resource-group", help="the workspace's resource group")
    where.add_argument("--workspace", help="the AzureML workspace's name")
    parser.add_argument("--compute", help="the compute cluster's name (default: job.yml's)")
    parser.add_argument("--instances", type=int,
                        help="nodes of the Ray cluster, 1 or more (default: job.yml's)")
    parser.add_argument("--experiment", help="the AzureML experiment (default: job.yml's)")
    parser.add_argument("--job", type=Path, default=JOB_FILE, help="the job spec to submit")
    parser.add_argument("--stream", action="store_true",
                        help="follow the job's logs until it ends")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for python -m rl_pbt")
    args = parser.parse_args(argv)
    named = (args.subscription, args.resource_group, args.workspace)
    if args.config is None and not all(named):
        parser.error("name the workspace: --config config.json, or --subscription, "
                     "--resource-group and --workspace")
    if args.instances is not None and args.instances < 1:
        parser.error(f"--instances: at least 1, got {args.instances}")
    return args


def build_job(
    path: Path, overrides: Sequence[str], compute: str | None = None,
    instances: int | None = None, experiment: str | None = None,
) -> Any:
    """Load the job spec and apply the command line; no workspace is needed for this.

    Overrides are shell-quoted: the job's command runs in a shell on every node.
    """
    from azure.ai.ml import load_job

    job = load_job(source=path)
    if overrides:
        job.command = f"{job.command} {shlex.join(overrides)}"
    if compute:
        job.compute = compute
    if instances is not None:
        job.resources.instance_count = instances
    if experiment:
        job.experiment_name = experiment
    return job


def workspace_client(args: argparse.Namespace) -> Any:
    """An MLClient on the workspace named by ``--config`` or by its three names."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    if args.config is not None:
        return MLClient.from_config(credential=credential, path=str(args.config))
    return MLClient(credential, args.subscription, args.resource_group, args.workspace)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = build_job(args.job, args.overrides, args.compute, args.instances, args.experiment)
    except ImportError:
        print('submit: needs the azureml extra: pip install -e ".[azureml]"', file=sys.stderr)
        return 2
    client = workspace_client(args)
    submitted = client.jobs.create_or_update(job)
    print(f"submitted {submitted.name} to {submitted.compute}: {submitted.studio_url}")
    if args.stream:
        client.jobs.stream(submitted.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
