from pathlib import Path

from tests.helpers import run_kernel_check


def test_async_scheduling_on_the_kernel_path_equals_sync():
    run_kernel_check(Path(__file__).with_name("kernel_path_async_check.py"), "kernel path async ok")
