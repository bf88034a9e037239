from pathlib import Path

from tests.helpers import run_kernel_check


def test_grouped_expand_kernel_matches_reference():
    run_kernel_check(Path(__file__).with_name("expand_kernel_check.py"), "expand kernel ok")
