"""Command-line checks that run before Hydra, so a misspelt option is one line, not a page."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rl_pbt.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: A run's record of its config, seed and tracking ids: the mark of an rl_pbt run folder.
RUN_INFO = "run.json"
_SIMPLE_CHOICE = re.compile(r"^[+~]?(?P<group>[A-Za-z_]+)=(?P<options>[\w.,-]*)$")


def is_multirun(argv: list[str]) -> bool:
    """Whether the command line asks Hydra for a sweep."""
    return bool({"-m", "--multirun"} & set(argv))


def check_modes(argv: list[str]) -> None:
    """Hydra takes one of --multirun and --cfg; both was its ValueError traceback."""
    if is_multirun(argv) and {"-c", "--cfg"} & set(argv):
        fail(ConfigError("--cfg shows one job's config; drop -m and give one value per key"))


def fail(err: ConfigError, exit_with: Callable[[int], NoReturn] = sys.exit) -> NoReturn:
    """Print one line and exit 2: the entry point's answer to bad input."""
    print(f"rl_pbt: error: {err}", file=sys.stderr)
    exit_with(2)


#: What a reader of :func:`parse_path_and_options` accepts, for its error; another reader says
#: it in its docstring's first line.
_KINDS: dict[Callable[[str], Any], str] = {int: "an integer", float: "a number", str: "text"}
_OPTION = re.compile(r"^[A-Za-z_]\w*=")


def parse_path_and_options(
    args: list[str], readers: dict[str, Callable[[str], Any]], defaults: dict[str, Any],
    usage: str, about: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``PATH key=value ...``, as the commands that work on a run folder take them.

    An argument is an option when it starts with a name and ``=`` and is not an existing path:
    Tune's trial folders have ``=`` in their names (``..._lr=0.0002,.../checkpoint_000004``).

    Args:
        args: the command line after the program name.
        readers: option name -> function that turns its text into a value (raises ValueError).
        defaults: option name -> value when the option is not given.
        usage: the line shown when the path is missing or doubled.
        about: the command's module docstring, which ``--help`` shows after its first line.
    """
    if any(a in ("-h", "--help") and not Path(a).exists() for a in args):
        _print_help(readers, defaults, usage, about or "")
    given = [a for a in args if _OPTION.match(a) and not Path(a).exists()]
    paths = [a for a in args if a not in given]
    if len(paths) != 1:
        raise ConfigError(f"usage: {usage}")
    options = dict(defaults)
    for arg in given:
        key, _, value = arg.partition("=")
        if key not in readers:
            raise ConfigError(f"{key}: unknown option; choose from {', '.join(readers)}")
        try:
            options[key] = readers[key](value)
        except ValueError:
            kind = _KINDS.get(readers[key]) or (readers[key].__doc__ or "").split("\n")[0]
            raise ConfigError(f"{key}: cannot read {value!r}; give {kind}") from None
    return Path(paths[0]), options


def _print_help(readers: dict[str, Callable[[str], Any]], defaults: dict[str, Any],
                usage: str, about: str) -> NoReturn:
    """The usage line, the command's description and each option's kind and default; exit 0."""
    about = about.split("\n", 2)[-1].strip()  # the docstring's first line is the usage
    lines = [f"usage: {usage}", "", *([about, ""] if about else []), "options:"]
    for key, reader in readers.items():
        kind = _KINDS.get(reader) or (reader.__doc__ or "").split("\n")[0]
        default = defaults.get(key)
        lines.append(f"  {key}=...  {kind}" +
                     ("" if default is None else f" (default: {str(default).lower()})"))
    print("\n".join(lines))
    sys.exit(0)


def discard_empty_output_dir() -> Path | None:
    """Remove the run folder Hydra made for a run that failed its checks; return the folder
    that holds something of the run, if any.

    Hydra writes ``.hydra/`` and a log before the job starts; when the config is then rejected,
    the folder holds nothing of the run and would only look like one.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    folder = Path(HydraConfig.get().runtime.output_dir)
    bookkeeping = {".hydra", f"{HydraConfig.get().job.name}.log"}
    kept: Path | None = folder
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= bookkeeping:
        shutil.rmtree(folder)
        _discard_empty_parents(folder, "outputs")
        kept = None
    sweep = Path(HydraConfig.get().sweep.dir).resolve()
    in_sweep = folder.parent.resolve() == sweep and sweep.is_dir()
    if in_sweep and {p.name for p in sweep.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep)  # a multirun that failed in its first job: nothing ran
        _discard_empty_parents(sweep, "multirun")
    return kept if kept is not None and kept.is_dir() else None


def _discard_empty_parents(folder: Path, top_name: str) -> None:
    """Hydra's default layout TOP/DATE/TIME: drop the DATE and TOP folders it made, when empty.
    A folder the user named with hydra.run.dir or hydra.sweep.dir is never touched above it."""
    date, top = folder.parent, folder.parent.parent
    if folder.exists() or top.name != top_name:
        return
    for parent in (date, top):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def check_new_run_dir(folder: Path) -> None:
    """Refuse to start a new run in a folder that holds one (``hydra.run.dir`` pointing at an
    old run, or two runs started in the same second): its records would merge with the old
    run's and its summary would report the old run's trials as its own."""
    if (folder / RUN_INFO).is_file():
        raise ConfigError(f"hydra.run.dir: {folder} already holds a run ({RUN_INFO}); pick a "
                          f"new folder, or resume={folder} to continue that run")


def check_run_dir_argument(argv: list[str]) -> None:
    """:func:`check_new_run_dir` for ``hydra.run.dir=FOLDER`` on the command line, before
    Hydra writes its ``.hydra/`` over the old run's (a resume names its folder on purpose)."""
    given = dict(a.split("=", 1) for a in argv if a.startswith(("hydra.run.dir=", "resume=")))
    if given.get("hydra.run.dir") and not given.get("resume") and not is_multirun(argv):
        try:
            check_new_run_dir(Path(given["hydra.run.dir"]).expanduser())
        except ConfigError as err:
            fail(err)


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_options(argv: list[str]) -> None:
    """Reject ``group=option`` overrides whose option does not exist, naming the closest.

    Only plain overrides and comma lists (sweeps) are checked; Hydra's richer override
    grammar is left to Hydra.
    """
    if any(a.startswith(_OTHER_CONFIG) for a in argv):
        return  # another config folder may add options (experiment=best): Hydra judges them
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


#: Mappings whose keys go on to RLlib or the env as they are: the YAML lists only some of them.
OPEN_MAPPINGS = {("algorithm", "config"), ("env", "env_config")}
_KEY_OVERRIDE = re.compile(r"^(?P<path>[A-Za-z_][\w-]*(?:\.[\w-]+)*)=")
#: Flags that load another primary config: keys are then not conf/config.yaml's.
_OTHER_CONFIG = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")


def check_override_keys(argv: list[str]) -> None:
    """Reject ``a.b=value`` overrides of keys the picked options do not have, as one line.

    Hydra refuses them too, in four lines and a hint about HYDRA_FULL_ERROR. Checked against
    the YAML files of the options picked on the command line (or by default). Whatever this
    cannot read as Hydra would is left to Hydra: another primary config, an ``experiment``
    (it may change anything), package overrides (``@``), a group picked with a sweep function
    such as ``choice()`` or ``glob()``, and option files composed from other groups.
    """
    keys = [arg.split("=")[0] for arg in argv]
    if any(k.startswith(_OTHER_CONFIG) or "@" in k or k.lstrip("+~") == "experiment"
           for k in keys):
        return
    root = _parse_yaml((CONF_DIR / "config.yaml").read_text())
    chosen = _chosen_options(argv, root.pop("defaults", []))
    root.update(dict.fromkeys(chosen))  # each group's name is a key of the composed config
    for arg in argv:
        match = _KEY_OVERRIDE.match(arg)
        if not match:  # +key=..., ~key, and Hydra's richer grammar
            continue
        path = match["path"].split(".")
        if path[0] == "hydra" or (len(path) == 1 and (CONF_DIR / path[0]).is_dir()):
            continue
        if not (CONF_DIR / path[0]).is_dir():
            _check_key(root, path, "the config")
            continue
        group, options = path[0], chosen.get(path[0]) or []
        trees = {option: _option_tree(group, option) for option in options}
        for option, tree in trees.items():
            others = [o for o, t in trees.items() if o != option and _has(t, path[1:])]
            _check_key(tree, path[1:], f"{group}={option}", group, others,
                       added=arg if tuple(path[:2]) in OPEN_MAPPINGS else None)
            _check_list_over_mapping(tree, path, arg, f"{group}={option}")


def check_sweep_jobs(argv: list[str]) -> None:
    """In a multirun's first job, compose and resolve every later job's config before the
    first job trains (the first job resolves its own right after).

    Hydra composes a job's config only when the job starts, so a bad value in a later job of
    the grid (``-m algorithm.config.gamma=0.99,abc``) failed after the jobs before it had
    trained. Each job's overrides (as Hydra's basic sweeper expands them) go through
    ``rl_pbt.resolve`` here; the first job that fails is the one error line. What this cannot
    expand as Hydra would (another sweeper or launcher, another primary config, a resume) or
    compose (Hydra's own errors) is left to the jobs.
    """
    if not is_multirun(argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra.")]
    if any(a.startswith(_OTHER_CONFIG) for a in argv) or any(
            o.lstrip("+~").startswith(("hydra/", "resume=")) for o in overrides):
        return
    import tempfile
    from contextlib import nullcontext

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rl_pbt.resolve import resolve

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        [jobs] = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # Hydra's grammar error: Hydra reports it
        return
    # Inside the running app (a multirun's first job) Hydra is set up with this config's path.
    hydra = (nullcontext() if GlobalHydra.instance().is_initialized()
             else initialize_config_dir(str(CONF_DIR), version_base="1.3"))
    with hydra, tempfile.TemporaryDirectory(prefix="rl_pbt_sweep_check_") as tmp:
        for number, job in enumerate(jobs[1:], 1):  # job 0 is this job: run() resolves it
            try:
                cfg = compose("config", overrides=job)
            except Exception:  # Hydra's composition error: the job reports it
                return
            try:
                resolve(cfg, Path(tmp) / str(number))
            except ConfigError as err:
                raise ConfigError(f"job {number} ({' '.join(job)}): {err}") from None


def _check_list_over_mapping(tree: Any, path: list[str], arg: str, where: str) -> None:
    """``key=[...]`` where the option has a mapping (a distribution spec): Hydra refuses to merge
    them in five lines; the one line says how to replace the mapping."""
    value = arg.partition("=")[2].strip()
    for key in path[1:]:
        if not isinstance(tree, dict) or key not in tree:
            return
        tree = tree[key]
    if isinstance(tree, dict) and value.startswith("["):
        name = ".".join(path)
        fail(ConfigError(f"{name}: a mapping in {where}, not a list; to replace it with a "
                         f"list: ~{name} +{arg}"))


def _has(tree: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _check_key(tree: Any, keys: list[str], where: str, group: str | None = None,
               swept_with_it: Sequence[str] = (), added: str | None = None) -> None:
    """Fail when ``keys`` (below ``group``, if any) meet a key missing from ``tree``.

    ``added``: the override, when it sets a key inside one of :data:`OPEN_MAPPINGS`; Hydra adds
    a key the YAML lacks only with ``+``, and the error says so (rl_pbt then checks the key
    against the algorithm's config)."""
    for depth, key in enumerate(keys):
        if not isinstance(tree, dict):
            return  # a value Hydra will judge (a list, null, a scalar), or an unread option
        if key not in tree:
            known = sorted(str(k) for k in tree)
            name = ".".join([*([group] if group else []), *keys[: depth + 1]])
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif swept_with_it:
                verb = "has" if len(swept_with_it) == 1 else "have"
                hint = (f"{' and '.join(f'{group}={o}' for o in swept_with_it)} {verb} it: sweep "
                        f"{where} separately without it")
            else:
                hint = f"it has {', '.join(known) or 'no keys'}"
            adding = f" (a key it lacks is added with +{added})" if added and depth else ""
            fail(ConfigError(f"{name}: no such key in {where}{adding}; {hint}"))
        tree = tree[key]


def _chosen_options(argv: list[str], defaults: list[Any]) -> dict[str, list[str] | None]:
    """Group -> the options this command line runs with (its ``group=a,b``, or the default
    from ``defaults``, config.yaml's list); None for a group picked in a way read here only by
    Hydra (``choice()``, ``glob()``...)."""
    chosen: dict[str, list[str] | None] = {}
    for entry in defaults:
        if isinstance(entry, dict):
            for group, option in entry.items():
                chosen[group] = [option] if option else []
    for arg in argv:
        match = _SIMPLE_CHOICE.match(arg)
        group = arg.split("=")[0].lstrip("+~")
        if match and (CONF_DIR / match["group"]).is_dir():
            chosen[match["group"]] = [o for o in match["options"].split(",") if o != "null"]
        elif "=" in arg and "." not in group and (CONF_DIR / group).is_dir():
            chosen[group] = None
    return chosen


def _parse_yaml(text: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(text) or {}


def _option_tree(group: str, option: str) -> dict[str, Any] | None:
    """An option's keys (``defaults`` entries of its own group merged in, as Hydra merges), or
    None when it is composed from elsewhere (then Hydra checks it)."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    if "@package" in text:
        return None
    tree = _parse_yaml(text)
    merged: dict[str, Any] = {}
    for entry in tree.pop("defaults", []):
        if not isinstance(entry, str):
            return None
        if entry != "_self_":
            base = _option_tree(group, entry)
            if base is None:
                return None
            _merge(merged, base)
    _merge(merged, tree)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep merge, as OmegaConf merges an option onto its defaults."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
