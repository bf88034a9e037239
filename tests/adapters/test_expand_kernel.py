from pathlib import Path

import pytest

from tests.helpers import run_kernel_check


def test_grouped_expand_kernel_matches_reference():
    run_kernel_check(Path(__file__).with_name("expand_kernel_check.py"), "expand kernel ok")


def test_expand_kernels_compile_for_sm90():
    """Every launch expand_grouped makes on Llama-3-8B's shapes (the H200's tuned configs and the defaults) lowers to
    sm_90 code (ptxas, no GPU needed), and the page kernel keeps its decode-sized tiles in registers."""
    pytest.importorskip("triton")
    from tests.adapters.expand_kernel_compile import compile_all

    rows = compile_all()
    assert {row["kernel"] for row in rows} == {"_expand_pages_kernel", "_expand_kernel", "_expand_token_kernel"}
    decode_pages = [row for row in rows if row["kernel"] == "_expand_pages_kernel" and row["BLOCK_T"] == 16]
    assert len(decode_pages) >= 8 and not [row for row in decode_pages if row["STACK"]], decode_pages
