"""HostStaging: a buffer refilled for a later step never changes a copy still queued for an earlier one."""

import pytest
import torch

from adapters.staging import HostStaging


def stage_three(device: str, busy=lambda: None) -> list[torch.Tensor]:
    like = torch.zeros(1024, dtype=torch.long)
    staging = HostStaging(like, torch.device(device))
    outs = [torch.empty(1024, dtype=torch.long, device=device) for _ in range(3)]
    busy()  # the copies queue behind it
    for value, out in enumerate(outs, start=1):
        staging.next()[:] = value  # the third fill reuses the first buffer
        staging.copy_to(out)
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_queued_copy_is_not_overwritten_on_cuda():
    outs = stage_three("cuda", busy=lambda: torch.cuda._sleep(200_000_000))  # ~0.1 s of device time ahead
    torch.cuda.synchronize()
    assert [o.unique().tolist() for o in outs] == [[1], [2], [3]]
