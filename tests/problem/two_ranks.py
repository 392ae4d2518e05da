"""Two gloo ranks under torchrun (tests/problem/test_sampling.py): the DeepSpeed integration's data-parallel problem
(each rank its contiguous share of the batch, statistics all_reduce-d; structured factors' rows all_gather-ed), its
sampled metrics saved by rank 0 for the test to compare with one process.

Usage: torchrun --nproc_per_node 2 tests/problem/two_ranks.py STORE_FILE OUT_FILE
"""

from __future__ import annotations

import os
import sys

import torch

import curvdist as cd
from curvdist.geometry.structured import LowRankFactor
from tests.cases import CASES

#: factor sides above this are structured in the token transformer case (vocabulary 17, classes 10, q/k/v 12)
STRUCTURED = 8


def rows(rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a low-rank statistic (3 + rank rows: the ranks' row counts differ)."""
    return torch.randn(3 + rank, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)


def main(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from curvdist.integrations.deepspeed.data_parallel import split_problem

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        case = CASES["mlp"]()
        p = split_problem(case.model(), case.loss, case.X, case.y, batch_size=4)
        result = {"kfac": cd.metric(p, "kfac", 1e-3, mc_samples=2, seed=5).to_dense(),
                  "diag": cd.metric(p, "diag_fisher_mc", 1e-3, mc_samples=2, seed=7).diagonal}
        tokens = CASES["token_transformer"]()
        p = split_problem(tokens.model(), tokens.loss, tokens.X, tokens.y, batch_size=2)
        M = cd.metric(p, "kfac", 1e-3, mc_samples=2, seed=3, structured_above=STRUCTURED)
        result["structured"] = [b.name for b in M.blocks if b.structured is not None]
        result["kfac_structured"] = M.to_dense()
        # a leaf structured on rank 0 but dense on rank 1 is densified on rank 0 before the collectives
        mine = rows(rank)

        def statistic(shard):  # type: ignore[no-untyped-def]
            return {"mixed": LowRankFactor.from_rows(mine) if rank == 0 else mine.T @ mine,
                    "structured": LowRankFactor.from_rows(mine)}

        total = p.reducer.sum(statistic)
        result["mixed"], result["gathered"] = total["mixed"], total["structured"].dense()
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1], sys.argv[2])
    # The work is done (rank 0 saved before the barrier, every rank left the group): leave without running C++
    # static destructors. At interpreter exit a rank aborted in ~10 % of runs here ("terminate called without an
    # active exception", no Python frame: a native thread still joinable at shutdown), failing torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
