"""Figures of degenerate sweeps (every trial alike, none scored) draw without matplotlib's layout warnings."""

import warnings

import pytest
from PIL import Image

from vitlab import plots


@pytest.mark.parametrize("trials", [
    [({"optim.lr": 1e-3}, 0.5), ({"optim.lr": 1e-3}, 0.5)],  # a PBT sweep whose trials ended alike
    [({"optim.lr": 1e-3}, 0.5), ({"optim.lr": 3e-3}, 0.7)],
    [],
])
def test_parallel_coordinates_lays_out_any_trials(trials, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "Tight layout not applied" when every trial had the same values
        out = plots.parallel_coordinates(trials, ["optim.lr"], {"optim.lr"}, "val_top1", tmp_path / "pc.png")
    assert Image.open(out).size == (600, 500)
