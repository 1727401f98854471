"""Start this machine's Ray while the driver is still importing RLlib and resolving the config.

Before ``Tuner.fit`` the driver spends ~3 s of one core on imports (Tune, then RLlib and torch
to check the config) while the other core idles, then ~3.4 s in ``ray.init``, mostly waiting for
Ray's processes to come up. Started first, Ray's processes use the idle core.

Ray ties the processes it starts to the *thread* that starts them (Linux's parent-death signal
fires when that thread ends; seen here: a task hung once the starting thread had returned), so
the thread that calls ``ray.init`` here lives as long as the process. Ray's log lines of the
start are held until the run takes Ray over, so a config that fails its checks meanwhile
prints its one error line and nothing of Ray's. Ray's processes get the environment as it is
at the start (rl_pbt sets no variable that they read). This module's import is light (no Ray):
it runs before the driver's heavy imports.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, Literal, NoReturn

from rl_pbt.values import is_count

#: What Ray logs when ``ray.init`` runs off the main thread; the handler it means is set here.
_SIGTERM_WARNING = "SIGTERM handler is not set"
#: Longest wait for a start that a failed run must let finish before the process ends.
SETTLE_TIMEOUT_S = 60.0

Started = Literal["started"]


class _EarlyStart:
    """``ray.init`` running in its own thread, and Ray's log records held meanwhile."""

    def __init__(self) -> None:
        self.done: Future[Started] = Future()
        self.held: list[logging.LogRecord] = []
        # ray.init(configure_logging=False) leaves the "ray" logger without handlers and not
        # propagating: its warnings reach Python's handler of last resort, held here meanwhile.
        self.last_resort = logging.lastResort
        logging.lastResort = _Holder(self.held, self.last_resort)

    def start(self, num_cpus: int | None) -> None:
        threading.Thread(target=self._start_and_stay, args=(num_cpus,), name="ray-start",
                         daemon=True).start()

    def _start_and_stay(self, num_cpus: int | None) -> None:
        try:
            init_local(num_cpus)
        except BaseException as err:  # handed to the thread that asks
            self.done.set_exception(err)
            return
        self.done.set_result("started")
        threading.Event().wait()  # never set: Ray's processes die when this thread ends

    def release_log(self) -> None:
        """Let Ray's log through again and replay what it logged meanwhile."""
        if logging.lastResort is not self.last_resort:
            logging.lastResort = self.last_resort
            for record in self.held:
                if _SIGTERM_WARNING not in record.getMessage():
                    logging.getLogger(record.name).handle(record)

    def settled(self) -> bool:
        """Wait for the start to end, up to :data:`SETTLE_TIMEOUT_S`; False if it did not."""
        try:
            self.done.exception(timeout=SETTLE_TIMEOUT_S)
        except TimeoutError:
            return False
        return True


class _Holder(logging.Handler):
    """Python's handler of last resort during the start: Ray's records wait, others pass."""

    def __init__(self, held: list[logging.LogRecord], other: logging.Handler | None) -> None:
        super().__init__(logging.WARNING)  # the level of the handler it stands in for
        self.held = held
        self.other = other

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "ray" or record.name.startswith("ray."):
            self.held.append(record)
        elif self.other is not None:
            self.other.handle(record)


#: The early start of this process until a run takes it over.
_early: _EarlyStart | None = None


def init_local(num_cpus: int | None) -> None:
    """``ray.init`` for a Ray of this machine, as every start of rl_pbt's makes it.

    No idle workers are prestarted: Tune gives every trainable a runtime env, and the actors a
    trial starts (remote env runners) inherit it, so none of them can use the idle workers
    (checked: a trainable's child actor got a new process beside two idle ones), whose boot
    only competed with the trials' start-up (0.4 s later to the first result).
    """
    import ray

    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"prestart_worker_first_driver": False},
    )


def start_early(resources: Mapping[str, Any]) -> None:
    """Begin starting Ray in a thread when this run will start one here with these settings.

    Only the plain case: no ``resources.address`` or ``RAY_ADDRESS`` (joining keeps its checks
    in :func:`rl_pbt.cluster.start_ray`), ``num_cpus`` null or a whole number >= 1 (a bad value
    is the resolve's error to report), and no Ray yet in this process (a sweep's later jobs).
    Anything else leaves the start to :func:`rl_pbt.cluster.start_ray`, as without this.
    """
    global _early
    plain, num_cpus = _plain_settings(resources)
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not plain or _early is not None or not on_main_thread:
        return
    import ray  # here: Ray's exit handler must be registered before ours

    if ray.is_initialized():
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # what ray.init sets on the main thread
    _early = _EarlyStart()
    atexit.register(_settle)  # runs before Ray's shutdown: never shut down a half-started Ray
    _early.start(num_cpus)


def _plain_settings(resources: Mapping[str, Any]) -> tuple[bool, int | None]:
    """Whether the early start applies, and ``resources.num_cpus``."""
    try:
        address, num_cpus = resources.get("address"), resources.get("num_cpus")
    except Exception:  # a config the resolve will reject or explain
        return False, None
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return False, None
    return num_cpus is None or is_count(num_cpus), num_cpus


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(signum)


def started_early() -> Started | None:
    """Take over the early start: ``"started"``, or None if none is pending (a sweep's later
    jobs find Ray running instead); raises the start's error.

    The start stays pending until it has ended, so that a Ctrl-C or SIGTERM during this wait
    still has the exit wait for it too.
    """
    global _early
    if _early is None:
        return None
    try:
        return _early.done.result()
    finally:
        if _early.done.done():
            _early.release_log()
            _early = None


def exit_process(code: int) -> NoReturn:
    """End a run that stopped before it took the early start over (its config failed a check).

    The start is waited for, then the process ends at once: Ray's processes end with the thread
    that started them (checked: none left 0.3 s later), 1.5 s sooner than ``ray.shutdown``; an
    exit during the start left Ray's two agent processes running for about 20 s. Without an
    early start pending this is ``sys.exit``.
    """
    if _early is None:
        sys.exit(code)
    _early.settled()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _settle() -> None:
    """At exit after an error the run did not expect: wait for a pending start before Ray's
    shutdown runs, and show what Ray logged. A start that does not end, or a second Ctrl-C
    meanwhile, ends the process at once (Ray's processes end with it)."""
    if _early is None:
        return
    try:
        settled = _early.settled()
    except BaseException:
        settled = False
    if not settled:
        os._exit(1)
    _early.release_log()
