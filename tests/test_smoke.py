import torch

import actors


async def test_send_compute_get(bob):
    x = actors.send(torch.tensor([1.0, 2.0]), bob)
    assert torch.equal(await ((x + 1) * 2).get(), torch.tensor([4.0, 6.0]))
