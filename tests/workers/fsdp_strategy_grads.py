"""torchrun worker: gradients of every pass strategy, with and without activation checkpointing,
on a tiny model sharded with FSDP2 over the launched ranks (gloo on CPU).

    torchrun --nproc_per_node W -m tests.workers.fsdp_strategy_grads OUT.pt   (from the repo root)

Each rank takes rows ``rank::W`` of the same 8-sample batch; gradients are normalised globally
(FSDP averages over ranks; ``* W / global weight``) as the distributed recipe does. Rank 0 saves
{(ac, strategy): {param name: full gradient}} and the per-sample losses to OUT.pt.
"""

import sys

import torch
import torch.distributed as dist
from torchtune import training

from tests.test_passes import HIDDEN, PAD, make_batch, make_model

from comparative_recipe.ablation.hidden import install_hidden_ablation
from comparative_recipe.ablation.plan import ablation_plan
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.passes import STRATEGIES, ComparativeStepSpec, comparative_step
from comparative_recipe.tasks import SFTTask
from comparative_recipe.training.distributed import all_reduce_sum, shard_model

BATCH = dict(batch_size=8, seq=40)
STEP = 5


def spec(strategy):
    return ComparativeStepSpec(plan=ablation_plan(n_hidden=1, n_input=1), task=SFTTask(),
                               loss_fn=ComparativeLoss(), strategy=strategy, crop_rate=0.4,
                               pad_id=PAD, seed=3)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = {k: v[rank::world] for k, v in make_batch(**BATCH).items()}
    found = {}
    for ac in (False, True):
        model = make_model(ac=ac)  # same seed: the same initial weights on every rank
        shard_model(model, cpu_offload=False)
        install_hidden_ablation(model, HIDDEN)
        for strategy in STRATEGIES:
            model.zero_grad(set_to_none=True)
            res = comparative_step(model, batch, spec(strategy), step=STEP,
                                   set_grad_sync=model.set_requires_gradient_sync)
            weight = all_reduce_sum(res.sample_weight.sum())
            training.scale_grads(model, world / weight)
            grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor()
                     for n, p in model.named_parameters()}
            losses = [torch.empty_like(res.losses) for _ in range(world)]
            dist.all_gather(losses, res.losses)
            found[(ac, strategy)] = {"grads": grads, "losses": losses}
    if rank == 0:
        torch.save(found, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
