from pathlib import Path

from tests.helpers import run_kernel_check


def test_fused_pointwise_kernels_match_references_and_the_decoder_pieces():
    run_kernel_check(Path(__file__).with_name("fused_pointwise_check.py"), "fused pointwise ok")
