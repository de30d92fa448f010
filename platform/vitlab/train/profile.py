"""``train.profile_steps: [start, end]``: a torch.profiler trace of optimizer steps start..end-1 on rank 0.

The trace (Chrome-trace JSON, which Perfetto and chrome://tracing open) and a table of the top operators by
time go to the MLflow run as artifacts under ``profile/``. Outside the window the loop pays one integer
comparison per step.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TOP_OPERATORS = 25


class StepProfiler:
    def __init__(self, start: int, end: int, uri: str | None, run_id: str | None):
        self.start, self.end, self.uri, self.run_id = start, end, uri, run_id
        self.prof: torch.profiler.profile | None = None
        self.done = False
        self.first = self.steps_done = start  # the window's first optimizer step; steps done so far

    def before_step(self, step: int) -> None:
        """``step``: the optimizer step about to run (0-based)."""
        if self.prof is None and not self.done and self.start <= step < self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.first = step

    def after_step(self, step: int) -> None:
        """``step``: the number of optimizer steps done."""
        self.steps_done = step
        if self.prof is not None and step >= self.end:
            self.finish()

    def finish(self) -> None:
        """Stop (also when training ends inside the window) and record the trace and the table."""
        if self.prof is None:
            return
        step = self.steps_done
        prof, self.prof, self.done = self.prof, None, True
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS)
        with tempfile.TemporaryDirectory(prefix="vitlab-profile-") as tmp:
            name = f"steps_{self.first}-{step - 1}"
            trace, text = Path(tmp) / f"{name}.trace.json", Path(tmp) / f"{name}.top_ops.txt"
            prof.export_chrome_trace(str(trace))
            text.write_text(f"optimizer steps {self.first}..{step - 1}, rank 0, sorted by {sort}\n\n{table}\n")
            log.info("profiled optimizer steps %d..%d: trace and top operators in the MLflow run's profile/",
                     self.first, step - 1)
            if self.uri and self.run_id:
                from vitlab import tracking

                try:
                    with tracking.quick_retries():
                        tracking.log_artifacts(self.uri, self.run_id, [trace, text], "profile")
                except tracking.unreachable_errors() as e:
                    log.warning("profile not logged to MLflow (%s)", e)
