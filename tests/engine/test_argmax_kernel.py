from pathlib import Path

from tests.helpers import run_kernel_check


def test_argmax_kernel_matches_torch_argmax():
    run_kernel_check(Path(__file__).with_name("argmax_kernel_check.py"), "argmax kernel ok")
