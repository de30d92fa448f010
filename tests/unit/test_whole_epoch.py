"""An epoch is reported only whole: every optimizer step trained and every val image validated."""

import pytest

from vitlab.train.epoch import IncompleteEpochError, check_whole_epoch


def test_a_whole_epoch_passes():
    check_whole_epoch(3, steps=22, expected_steps=22, val_images=360, val_rows=360)


@pytest.mark.parametrize("steps, val_images", [(21, 360), (22, 0), (22, 359), (0, 0)])
def test_a_short_epoch_or_validation_is_not_reported(steps, val_images):
    # a worker group stopped for a resize ends its iterators: a validation of no images is not val_top1 0
    with pytest.raises(IncompleteEpochError, match=rf"epoch 3: trained {steps} of its 22 steps and validated "
                                                   rf"{val_images} of the 360 val images: a data stream ended early"):
        check_whole_epoch(3, steps=steps, expected_steps=22, val_images=val_images, val_rows=360)
