from pathlib import Path

from tests.helpers import run_kernel_check


def test_fused_rms_norm_matches_reference_and_transformers():
    run_kernel_check(Path(__file__).with_name("rms_norm_check.py"), "rms norm ok")
