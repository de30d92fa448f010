"""Population Based Training for vitlab's trials: Ray's scheduler, with two cases it gets wrong mended.

* A donor's checkpoint outlives the donor's own retention. A trial's Tune checkpoint only names a Train
  checkpoint (see ``pointer``), and the donor's Train run keeps ``run.keep_checkpoints`` of its own. Ray's PBT
  remembers a donor's checkpoint when the donor is in the upper quantile and hands it to a lower-quantile trial
  at that trial's next perturbation, by when the donor, still training (``synch: false``, or a synchronous
  population larger than the cluster runs at once), may have deleted it: the exploiting trial then fails with
  "not a vitlab checkpoint" (seen with the digits PBT space: 2 of 4 trials errored). Here, the moment a donor is
  remembered, its Train checkpoint is copied to ``<sweep>/trials/pbt_donors/<trial>_e<epoch>/checkpoint`` and PBT
  holds a pointer to the copy (beside it, in ``pointer/``); a donor's older copies go once no trial still starts
  from them, and all of them at the end of a sweep that has no errored trial.
* Synchronous mode survives a trial that comes back later than Tune heard. A vitlab trial continues its Train run
  from that run's own latest checkpoint (no epoch trained twice), so a trial that Tune paused after epoch E,
  while its Train run went on to register E + 1, reports E + 2 next: its time jumps. Ray's synchronous PBT then
  sets the next sync time to the latest time it has seen; when an exploit has copied that time to the other
  trials, every trial is paused at or past the sync time, choose_trial_to_run starts none of them, and the sweep
  waits forever (seen with 2 trials, synch: true).
"""

from __future__ import annotations

import logging

from ray.train._internal.session import _FutureTrainingResult
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining

from vitlab.data import publish
from vitlab.train import state as train_state
from vitlab.train import storage
from vitlab.tune import pointer as checkpoint_pointer

log = logging.getLogger(__name__)

DONORS_DIR = "pbt_donors"  # under the sweep's trials/ directory, beside the trials' Train runs


def remove_donor_copies(sweep_dir: str) -> None:
    """At the end of a sweep with no errored trial (which --resume would restart, maybe from a copy): no trial
    will start from a donor's copy again."""
    storage.remove_dir(storage.join(sweep_dir, "trials", DONORS_DIR))


class VitlabPBT(PopulationBasedTraining):
    def _checkpoint_or_exploit(self, trial: Trial, tune_controller, upper_quantile: list[Trial],
                               lower_quantile: list[Trial]) -> None:
        super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)
        state = self._trial_state[trial]
        if trial in upper_quantile and state.last_checkpoint is not None:
            state.last_checkpoint = self._donor_copy(trial, tune_controller)

    def _donor_copy(self, trial: Trial, tune_controller):
        """The donor's latest checkpoint as a pointer to a copy of its Train checkpoint (None: nothing to copy,
        so PBT skips exploits of this donor until its next perturbation)."""
        state = self._trial_state[trial]
        checkpoint = state.last_checkpoint
        if isinstance(checkpoint, _FutureTrainingResult):  # a running trial's save: resolved as Ray's exploit does
            result = checkpoint.resolve()
            if result is None:
                return None
            state.last_result, checkpoint = result.metrics, result.checkpoint
        train_pointer = checkpoint_pointer.read(checkpoint)
        if train_pointer is None:
            return checkpoint
        source = train_pointer["path"]
        donors = storage.join(source.rstrip("/").rsplit("/", 2)[0], DONORS_DIR)  # <sweep>/trials/pbt_donors
        copy = storage.join(donors, f"{trial.trial_id}_e{train_pointer['epoch']:04d}")
        try:
            if not storage.exists(storage.join(copy, "pointer", checkpoint_pointer.POINTER_FILE)):
                storage.copy_dir(source, storage.join(copy, "checkpoint"))
                # the donor's run keeps its latest checkpoint until its next one: if that came during the copy,
                # the source is gone now and the copy may be short of files
                if not storage.exists(storage.join(source, train_state.STATE_FILE)):
                    raise FileNotFoundError(f"{source} was deleted while it was copied")
            # the pointer apart from the copy: reading it does not download the checkpoint
            copied = checkpoint_pointer.write(storage.join(copy, "pointer"),
                                              {**train_pointer, "path": storage.join(copy, "checkpoint")})
        except OSError as e:
            log.warning("PBT: trial %s is not a donor until its next perturbation: its checkpoint %s could not be "
                        "copied (%s)", trial.trial_id, source, storage.first_line(e))
            publish.discard(copy)  # a failed copy's remains; a failure to remove them is a warning too
            return None
        self._remove_unused_copies(trial, donors, copy, tune_controller)
        return copied

    def _remove_unused_copies(self, trial: Trial, donors: str, keep: str, tune_controller) -> None:
        """A donor's earlier copies, once no trial's latest checkpoint (an exploit not yet restarted, or
        restarted but not yet reported) and no PBT state names them."""
        held = [t.checkpoint for t in tune_controller.get_trials()]
        held += [s.last_checkpoint for s in self._trial_state.values()]
        in_use = {getattr(c, "path", None) for c in held}
        for name in storage.list_names(donors):
            copy = storage.join(donors, name)
            pointer_path = storage.filesystem(storage.join(copy, "pointer"))[1]
            if name.startswith(f"{trial.trial_id}_e") and copy != keep and pointer_path not in in_use:
                storage.remove_dir(copy)

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
