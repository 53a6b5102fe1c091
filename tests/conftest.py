"""Settings for the whole test session."""

import os


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): two test processes per core. The end-to-end tests spend most of
    their time waiting on the processes they start (gunicorn, fake backends), so twice the
    cores keeps the cores busy without making the processes under test fight for them; the
    unit tests alone run fastest with `-n 0`."""
    return 2 * (len(os.sched_getaffinity(0)) or 1)
