from pathlib import Path

from tests.helpers import run_kernel_check


def test_paged_decode_attention_matches_reference():
    run_kernel_check(Path(__file__).with_name("decode_attention_check.py"), "decode attention ok")
