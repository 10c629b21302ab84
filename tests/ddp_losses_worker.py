"""Run by tests/test_losses.py as `torchrun --nproc_per_node=2 --standalone` (gloo, CPU).

Every loss is computed in float64 twice: first on the whole batch before the process group exists
(so world size really is 1), then with each rank holding only its share of the batch (unequal
shares on purpose). The inputs play the role of parameters replicated on every rank; their
gradients are averaged over ranks exactly as DDP does before the optimizer step. Loss values
(averaged over ranks), those gradients and the teacher centres must match within 1e-6.
"""

import gc
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import losses

TOL = 1e-6
BATCH = [4, 3]  # images per rank
REGIONS = [[6, 3], [5, 0], [0, 0]]  # boxes per rank: unequal, one rank without, none at all


def my_rows(sizes):
    """This process's slice of a batch split as `sizes`: all of it at world size 1."""
    if losses.world() == 1:
        return slice(0, sum(sizes))
    start = sum(sizes[: losses.rank()])
    return slice(start, start + sizes[losses.rank()])


def views(x, n_views, rows):
    """Rows of a view-major (n_views * B, K) tensor that belong to images `rows`, still view-major."""
    return x.unflatten(0, (n_views, -1))[:, rows].flatten(0, 1)


def evaluate():
    """All losses on this process's rows -> {name: loss value, DDP-averaged gradients, centres}."""
    g = torch.Generator().manual_seed(0)
    out = {}

    def leaf(*shape):
        return torch.randn(shape, generator=g).requires_grad_()

    def report(name, loss, params):
        loss.backward()
        out[name] = losses.all_reduce_mean(loss)
        for i, p in enumerate(params):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            out[f"{name}.grad{i}"] = losses.all_reduce_mean(grad)  # what DDP hands the optimizer

    b = sum(BATCH)
    mine = my_rows(BATCH)

    img, txt, scale, bias = leaf(b, 8), leaf(b, 8), leaf(), leaf()
    clip = losses.siglip_loss(F.normalize(img, dim=-1)[mine], F.normalize(txt, dim=-1)[mine], scale.exp() * 5, bias)
    report("clip", clip["clip"], [img, txt, scale, bias])

    # Two DINO steps: the second one uses the centre updated (all-reduced) by the first.
    k = 6
    s_global, s_local = leaf(2 * b, k), leaf(3 * b, k)
    teachers = [torch.randn(2 * b, k, generator=g) for _ in range(2)]
    dino = losses.DINOLoss(k)
    dino.center.copy_(torch.randn(1, k, generator=g))
    loss = sum(dino(views(s_global, 2, mine), views(s_local, 3, mine), views(t, 2, mine), 0.05)["dino"]
               for t in teachers)
    report("dino", loss, [s_global, s_local])
    out["dino.center"] = dino.center.clone()

    # iBOT: image 2 has no masked patch; in the second call rank 1 has none at all.
    n = 6
    student, teacher = leaf(b, n, k), torch.randn(b, n, k, generator=g)
    mask = torch.rand(b, n, generator=g) < 0.4
    mask[:, 0], mask[2] = True, False
    mask_rank0_only = mask.clone()
    mask_rank0_only[BATCH[0]:] = False
    ibot = losses.IBOTLoss(k)
    loss = sum(ibot(student[mine], teacher[mine], m[mine], 0.06)["ibot"] for m in (mask, mask_rank0_only))
    report("ibot", loss, [student])
    out["ibot.center"] = ibot.center.clone()

    # The same two with DINOv2's Sinkhorn-Knopp: its sums run over the global batch (all-reduced),
    # and in iBOT's second call rank 1 takes part with no masked patch.
    dino_sk = losses.DINOLoss(k, centering="sinkhorn")
    loss = sum(dino_sk(views(s_global, 2, mine), views(s_local, 3, mine), views(t, 2, mine), 0.05)["dino"]
               for t in teachers)
    report("dino_sinkhorn", loss, [s_global, s_local])
    ibot_sk = losses.IBOTLoss(k, centering="sinkhorn")
    loss = sum(ibot_sk(student[mine], teacher[mine], m[mine], 0.06)["ibot"] for m in (mask, mask_rank0_only))
    report("ibot_sinkhorn", loss, [student])

    # Depth: image 5 (on rank 1) has no valid pixel.
    pred, target = leaf(b, 16, 16), torch.rand(b, 16, 16, generator=g)
    valid = torch.rand(b, 16, 16, generator=g) > 0.3
    valid[5] = False
    report("depth", losses.depth_loss(pred[mine], target[mine], valid[mine])["depth"], [pred])

    for sizes in REGIONS:
        r, rows = sum(sizes), my_rows(sizes)
        region, name, scale, bias = leaf(r, 8), leaf(r, 8), leaf(), leaf()
        name_id = torch.randint(0, 4, (r,), generator=g)  # few ids: many regions share a name
        loss = losses.ground_loss(F.normalize(region, dim=-1)[rows], F.normalize(name, dim=-1)[rows],
                                  name_id[rows], scale.exp() * 5, bias)["ground"]
        report(f"ground{sizes}", loss, [region, name, scale, bias])
    return out


def main():
    torch.set_default_dtype(torch.float64)
    assert not dist.is_initialized() and losses.world() == 1
    reference = evaluate()  # one process, whole batch
    dist.init_process_group("gloo")
    ours = evaluate()  # this rank's share
    errors = {key: (ours[key] - ref).abs().max().item() if ref.numel() else 0.0
              for key, ref in reference.items()}
    bad = {key: e for key, e in errors.items() if not e <= TOL}
    rank = dist.get_rank()
    if bad:
        print(f"rank {rank}: MISMATCH {bad}", flush=True)
    else:
        print(f"rank {rank}: all losses equal the single-process full batch "
              f"({len(errors)} tensors, max abs difference {max(errors.values()):.1e})", flush=True)
    # Clean gloo shutdown; without it about one run in three aborts at exit.
    del reference, ours
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
