"""The population's search: Tune's variant generator, open for as long as a trial is alive.

Tune keeps a paused trial's actor for reuse only while its search algorithm is unfinished or a
trial is staged to run, and a variant generator is finished as soon as it has made every trial
of the population, at the start. From then on, a trial that pauses when nothing is staged loses
its process, and the next trial to run boots a new one (5-7 s here with RLlib, one slot idle):
synchronous PBT does that every round (the trials that reach the sync point early pause with no
one left to run), and asynchronous PBT does it whenever two trials pause within one step of Tune.
While the search is open, Tune keeps one paused actor in its cache for the next trial instead.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.search.basic_variant import BasicVariantGenerator


class PopulationSearch(BasicVariantGenerator):
    """A ``BasicVariantGenerator`` that is finished only once it has made every trial and
    every trial it made has ended (or the experiment is stopped as a whole).

    The trials' own statuses decide, not a count of completions, so a trial that ends by a path
    that does not tell the search cannot keep the experiment from ending. A restored experiment
    brings its trials back from its own state, not from this search: there the search is
    finished as Tune's is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: list[Trial] = []
        self._exhausting = False
        self._stopped = False

    def next_trial(self) -> Trial | None:
        if self._finished:  # every trial made: nothing to ask the generator for
            return None
        self._exhausting = True  # the generator calls set_finished when it runs out
        try:
            trial = super().next_trial()
        finally:
            self._exhausting = False
        if trial is not None:
            self._made.append(trial)
        return trial

    def set_finished(self) -> None:
        """Tune calls this to stop the whole experiment (a stopper's ``stop_all``)."""
        super().set_finished()
        if not self._exhausting:
            self._stopped = True

    def is_finished(self) -> bool:
        if not self._finished:
            return False
        return self._stopped or all(
            trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in self._made)

    def get_state(self) -> Any:
        """Tune saves the search with the experiment; the trials are saved by Tune itself."""
        state = super().get_state()
        if state:
            state = {**state, "_made": []}
        return state
