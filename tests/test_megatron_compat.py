"""megatron-core's destroy_model_parallel, as patched: process groups are destroyed, rank lists forgotten."""

import pytest


@pytest.mark.compat
def test_reinitialising_model_parallel_leaks_no_process_groups(megatron_single):
    import torch.distributed as dist
    from megatron.core import parallel_state

    counts = []
    for _ in range(3):
        parallel_state.destroy_model_parallel()
        assert parallel_state._EMBEDDING_GLOBAL_RANKS is None
        parallel_state.initialize_model_parallel(1, 1)
        counts.append(len(dist.distributed_c10d._world.pg_map))
    assert counts[0] == counts[1] == counts[2], counts
