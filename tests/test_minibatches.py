"""rl_pbt's index minibatches are the rows RLlib's cyclic iterator yields, with the same draws."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.minibatch_utils import MiniBatchCyclicIterator

from rl_pbt.minibatches import cyclic_minibatches


@pytest.mark.parametrize(("rows", "size", "epochs", "shuffle"), [
    (500, 96, 3, True),    # wraps mid-minibatch
    (512, 128, 2, True),   # a minibatch ends exactly at the batch's end
    (50, 96, 2, True),     # minibatch larger than the batch
    (300, 100, 1, False),
    (300, 70, 2, False),   # unshuffled, wrapping mid-minibatch
    (50, 130, 3, True),    # one minibatch wraps the batch more than twice
])
def test_the_rows_and_the_random_stream_are_rllibs(rows, size, epochs, shuffle):
    np.random.seed(4)
    batch = MultiAgentBatch({"p": SampleBatch({"row": np.arange(rows)})}, rows)
    theirs = [mb.policy_batches["p"]["row"] for mb in MiniBatchCyclicIterator(
        batch, num_epochs=epochs, minibatch_size=size, shuffle_batch_per_epoch=shuffle)]
    their_next_draw = np.random.rand()
    np.random.seed(4)
    ours = cyclic_minibatches(rows, size, epochs, shuffle)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.random.rand() == their_next_draw
