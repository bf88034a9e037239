from pathlib import Path

from tests.helpers import run_kernel_check


def test_shrink_concat_kernel_matches_reference():
    run_kernel_check(Path(__file__).with_name("shrink_kernel_check.py"), "shrink kernel ok")
