"""The two-kernel argmax vs torch's on random logits with ties, -inf rows and strided rows (run by
test_argmax_kernel.py; natively on a GPU, else in Triton's interpreter)."""

import sys

import torch

from server.engine import argmax_kernel
from server.engine.argmax_kernel import argmax_rows


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    cases = 0
    chunk = argmax_kernel.CHUNK
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, vocab in ((1, 5), (3, chunk), (5, chunk + 1), (64, 3 * chunk + 77)):
            logits = (torch.randn(rows, vocab + 3, generator=gen) * 4).to(dtype)
            logits = logits.round()  # many ties, across chunks too: the first index wins
            logits[0, vocab - 1] = logits[0, :vocab].max()  # the row's max again, at its last column
            if rows > 2:
                logits[2, :] = -float("inf")  # argmax 0
            view = logits.to(device)[:, :vocab]  # strided rows
            got = argmax_rows(view)
            assert got.dtype == torch.long
            torch.testing.assert_close(got.cpu(), view.cpu().float().argmax(-1), rtol=0, atol=0)
            cases += 1
    logits = torch.tensor([[1.0, float("nan"), 3.0]], device=device)  # NaN counts as +inf, as torch's argmax
    assert argmax_rows(logits).tolist() == [1] == logits.argmax(-1).tolist()
    print(f"argmax kernel ok on {device}: {cases + 1} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
