"""Peak memory measurement (perf.py): a stage's peak is its own, and a block inside it (a Trainer's fit) measures its
own peak without hiding it from the stage's."""
import sys

import pytest
import torch

from gptstack.perf import peak_rss_mb, peak_rss_within, reset_peak_rss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the high-water mark resets on Linux only")

MB = 1024 * 1024


def allocate(mb: int) -> None:
    """Touch `mb` MiB and free them: the resident high-water mark rises by about that much."""
    block = torch.ones(mb * MB // 4)
    del block


def test_a_block_measures_its_own_peak_and_the_measurement_around_it_still_sees_it():
    allocate(400)  # an earlier stage's peak
    earlier = peak_rss_mb()
    assert reset_peak_rss()
    start = peak_rss_mb()
    assert start < earlier - 300  # the earlier stage's peak is forgotten
    allocate(300)  # before the block
    with peak_rss_within() as block:
        allocate(150)
    assert block.mb is not None and block.mb < start + 250  # the block's 150, not the 300 before it
    assert block.mb > start + 100
    assert peak_rss_mb() > start + 250  # the stage still counts the 300 MiB it reached before the block
