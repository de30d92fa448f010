"""Population Based Training, with synchronous mode safe for trials that come back later than Tune heard.

A vitlab trial continues its Train run from that run's own latest checkpoint (no epoch trained twice). A trial
that Tune paused after epoch E, while its Train run went on to register E + 1, therefore reports E + 2 next: its
time jumps. Ray's synchronous PBT then sets the next sync time to the latest time it has seen; when an exploit
has copied that time to the other trials, every trial is paused at or past the sync time, its
choose_trial_to_run starts none of them, and the sweep waits forever (seen with 2 trials, synch: true).
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining


class SyncSafePBT(PopulationBasedTraining):
    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]
        if not waiting or any(t.status == Trial.RUNNING for t in trials):
            return None  # the running trials are still on their way to the sync time
        # Every live trial is paused at or past the sync time, and each of them has been perturbed there: the
        # next sync is one interval past the latest of them.
        latest = max(self._trial_state[t].last_train_time for t in waiting)
        self._next_perturbation_sync = latest + self._perturbation_interval
        return super().choose_trial_to_run(tune_controller)
