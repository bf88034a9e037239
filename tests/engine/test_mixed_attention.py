from pathlib import Path

from tests.helpers import run_kernel_check


def test_mixed_step_attention_matches_each_sequences_reference():
    run_kernel_check(Path(__file__).with_name("mixed_attention_check.py"), "mixed attention ok")
