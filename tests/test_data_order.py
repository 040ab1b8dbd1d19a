"""The data order: sharded batches reassemble the 1-process batch, start at any step, and cover each epoch."""
import torch
from torch.utils.data import TensorDataset

from isofast import distributed as D
from isofast.data.order import EpochOrder, StepBatchSampler, epoch_permutation, step_batches


def test_sharded_batches_reassemble_the_one_process_batch_and_start_anywhere():
    n, batch, seed = 23, 6, 4
    one = iter(StepBatchSampler(n, batch, seed, slice(0, batch)))
    shards = [iter(StepBatchSampler(n, batch, seed, D.rank_rows(batch, r, 3))) for r in range(3)]
    seen = []
    for _ in range(8):  # spans 3 epochs of 3 batches (tails of 5 samples dropped)
        full = next(one)
        assert sum((next(s) for s in shards), []) == full
        seen.append(full)
    late = iter(StepBatchSampler(n, batch, seed, slice(0, batch), start_step=5))
    assert [next(late) for _ in range(3)] == seen[5:8]
    order = EpochOrder(n, batch, seed)
    assert sorted(sum((order.indices(s).tolist() for s in range(3)), [])) == sorted(set(sum(seen[:3], [])))


def test_step_batches_of_a_tensor_and_of_a_dataset_are_the_rows_of_the_global_batch():
    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    order = EpochOrder(10, 4, seed=1)
    rows = slice(2, 4)
    from_tensor = step_batches(data, order, rows, 3, torch.device("cpu"))
    from_dataset = step_batches(TensorDataset(data), EpochOrder(10, 4, seed=1), rows, 3, torch.device("cpu"))
    for step in range(3, 8):  # 2 batches per epoch: crosses three epochs
        epoch, pos = divmod(step, 2)
        want = data[epoch_permutation(10, 1, epoch)[pos * 4:(pos + 1) * 4][rows]]
        assert torch.equal(next(from_tensor), want) and torch.equal(next(from_dataset), want)
