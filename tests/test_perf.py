"""Peak memory measurement (perf.py): a stage's peak is its own, and a block inside it (a Trainer's fit) measures its
own peak without hiding it from the stage's. The memory is mapped and unmapped directly (an allocator may keep freed
memory resident and reuse it), in a fresh interpreter."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the high-water mark resets on Linux only")

SCENARIO = """
import json, mmap
from gptstack.perf import peak_rss_mb, peak_rss_within, reset_peak_rss

def allocate(mb):  # map `mb` MiB, touch every page, unmap: resident for a moment, whatever the allocator keeps
    block = mmap.mmap(-1, mb * 1024 * 1024)
    for page in range(0, len(block), mmap.PAGESIZE):
        block[page] = 1
    block.close()

allocate(400)  # an earlier stage's peak
out = {"earlier": peak_rss_mb(), "reset": reset_peak_rss(), "start": peak_rss_mb()}
allocate(300)  # the stage, before the block
with peak_rss_within() as block:
    allocate(150)
out |= {"block": block.mb, "stage": peak_rss_mb()}
print(json.dumps(out))
"""


def test_a_block_measures_its_own_peak_and_the_measurement_around_it_still_sees_it():
    res = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["reset"] and got["start"] < got["earlier"] - 300  # the earlier stage's peak is forgotten
    assert got["start"] + 100 < got["block"] < got["start"] + 250  # the block's 150 MiB, not the 300 before it
    assert got["stage"] > got["start"] + 250  # the stage still counts the 300 MiB it reached before the block
