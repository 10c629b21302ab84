"""losses.py against plain float64 loop implementations, invariances, edge cases, and DDP equality."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losses

ROOT = Path(__file__).resolve().parents[1]


def leaf(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()


def unit(*shape, seed=0):
    return F.normalize(leaf(*shape, seed=seed).detach(), dim=-1).requires_grad_()


def grads(value, inputs):
    return torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)


def assert_same(ours, ref, inputs, tol=1e-9):
    assert torch.isfinite(ours) and abs(ours.item() - ref.item()) < tol * max(1.0, abs(ref.item()))
    for a, b in zip(grads(ours, inputs), grads(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def log_sigmoid(z):
    return -torch.log(1 + torch.exp(-z))


def softmax(row):  # one (K,) row
    e = [torch.exp(v - row.max()) for v in row]
    return torch.stack(e) / sum(e)


def cross_entropy(q, student_row, temp):  # -sum_k q_k log softmax(student / temp)_k
    z = student_row / temp
    log_norm = torch.log(sum(torch.exp(v) for v in z))
    return -sum(q[k] * (z[k] - log_norm) for k in range(len(z)))


# -----------------------------------------------------------------------------------------------
# clip and ground


def ref_siglip(img, txt, scale, bias):
    b = len(img)
    total = sum(-log_sigmoid((1 if i == j else -1) * (scale * (img[i] @ txt[j]) + bias))
                for i in range(b) for j in range(b))
    return total / b


def test_siglip_matches_loops():
    img, txt = unit(5, 8, seed=1), unit(5, 8, seed=2)
    scale, bias = torch.tensor(10.0, dtype=torch.float64, requires_grad=True), leaf(seed=3)
    out = losses.siglip_loss(img, txt, scale, bias)
    assert_same(out["clip"], ref_siglip(img, txt, scale, bias), [img, txt, scale, bias])
    assert set(out) == {"clip", "clip_pos_logit", "clip_neg_logit", "clip_acc"}
    assert all(not v.requires_grad for k, v in out.items() if k != "clip")


def test_siglip_symmetric_and_batch_of_one():
    img, txt = unit(4, 8, seed=1), unit(4, 8, seed=2)
    a = losses.siglip_loss(img, txt, 10.0, -10.0)["clip"]
    b = losses.siglip_loss(txt, img, 10.0, -10.0)["clip"]
    torch.testing.assert_close(a, b)
    one = losses.siglip_loss(img[:1], txt[:1], 10.0, -10.0)
    assert all(torch.isfinite(v) for v in one.values())
    assert one["clip_acc"] == 1 and float(one["clip_neg_logit"]) == 0  # no negative pair at B = 1


def ref_ground(region, name, ids, scale, bias):
    r = len(region)
    total = sum(-log_sigmoid((1 if ids[i] == ids[j] else -1) * (scale * (region[i] @ name[j]) + bias))
                for i in range(r) for j in range(r))
    return total / r


def test_ground_matches_loops_with_repeated_names():
    region, name = unit(6, 8, seed=4), unit(6, 8, seed=5)
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    scale, bias = torch.tensor(5.0, dtype=torch.float64, requires_grad=True), leaf(seed=6)
    out = losses.ground_loss(region, name, ids, scale, bias)
    assert_same(out["ground"], ref_ground(region, name, ids, scale, bias), [region, name, scale, bias])


def test_ground_symmetric_and_no_boxes():
    region, name, ids = unit(5, 8, seed=4), unit(5, 8, seed=5), torch.tensor([1, 2, 1, 3, 4])
    a = losses.ground_loss(region, name, ids, 5.0, -2.0)["ground"]
    torch.testing.assert_close(a, losses.ground_loss(name, region, ids, 5.0, -2.0)["ground"])
    empty_r, empty_n = unit(0, 8), unit(0, 8)
    bias = leaf(seed=1)
    out = losses.ground_loss(empty_r, empty_n, torch.zeros(0, dtype=torch.long), 5.0, bias)
    assert out["ground"].item() == 0 and all(torch.isfinite(v) for v in out.values())
    out["ground"].backward()
    assert empty_r.grad.shape == (0, 8) and float(bias.grad) == 0


# -----------------------------------------------------------------------------------------------
# ssl


def ref_dino(s_global, s_local, t_global, center, n_global, student_temp, teacher_temp, targets=None):
    """Loops over (teacher view, student view, image); returns (loss, new centre). targets: the
    teacher's (G*B, K) distributions when they are not the centred softmax (Sinkhorn-Knopp)."""
    b = len(t_global) // n_global
    student = s_global if s_local is None else torch.cat([s_global, s_local])
    n_views = len(student) // b
    total, count = 0, 0
    for t in range(n_global):
        for s in range(n_views):
            if s == t:
                continue
            for i in range(b):
                q = softmax((t_global[t * b + i].detach() - center) / teacher_temp) if targets is None \
                    else targets[t * b + i]
                total = total + cross_entropy(q, student[s * b + i], student_temp)
                count += 1
    new_center = 0.9 * center + 0.1 * sum(t_global.detach()) / len(t_global)
    return total / count, new_center


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_matches_loops_and_updates_center(n_local):
    b, k = 3, 6
    s_global, t_global = leaf(2 * b, k, seed=1, scale=2), leaf(2 * b, k, seed=2, scale=2)
    s_local = leaf(n_local * b, k, seed=3, scale=2) if n_local else None
    dino = losses.DINOLoss(k).double()
    dino.center.copy_(leaf(1, k, seed=4).detach()[0])
    ref, new_center = ref_dino(s_global, s_local, t_global, dino.center[0].clone(), 2, 0.1, 0.05)
    out = dino(s_global, s_local, t_global, 0.05)
    inputs = [s_global] + ([s_local] if n_local else [])
    assert_same(out["dino"], ref, inputs)
    torch.testing.assert_close(dino.center[0], new_center)
    assert t_global.grad is None  # the teacher gets no gradient


def test_dino_identical_distributions_reach_the_teacher_entropy():
    # Student and teacher give the same distribution in every view: the cross-entropy equals the
    # teacher's entropy, its minimum over student outputs (the KL part is zero).
    torch.manual_seed(0)
    k = 5  # small logits keep the sharpened teacher away from one-hot, where every loss is ~0
    teacher = 0.05 * torch.randn(1, k, dtype=torch.float64).repeat(4, 1)  # 2 views x 2 images, all alike
    student = (teacher * 0.1 / 0.04).requires_grad_()  # student / 0.1 == teacher / 0.04
    out = losses.DINOLoss(k).double()(student, None, teacher, 0.04)
    torch.testing.assert_close(out["dino"], out["dino_teacher_entropy"])
    (g,) = grads(out["dino"], [student])
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-12, rtol=0)
    noisy = student.detach() + torch.randn(4, k, dtype=torch.float64)
    assert losses.DINOLoss(k).double()(noisy, None, teacher, 0.04)["dino"] > out["dino"]


def test_dino_batch_of_one_and_temperature_schedule():
    out = losses.DINOLoss(4)(torch.randn(2, 4), torch.randn(4, 4), torch.randn(2, 4), 0.04)
    assert all(torch.isfinite(v) for v in out.values())
    assert losses.teacher_temp_schedule(0, 10) == 0.04
    assert math.isclose(losses.teacher_temp_schedule(5, 10), 0.055)
    assert losses.teacher_temp_schedule(10, 10) == losses.teacher_temp_schedule(99, 10) == 0.07
    assert losses.teacher_temp_schedule(0, 0) == 0.07


def test_centres_only_move_in_training_mode():
    dino, ibot = losses.DINOLoss(4).eval(), losses.IBOTLoss(4).eval()
    dino(torch.randn(4, 4), None, torch.randn(4, 4), 0.04)
    ibot(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), 0.04)
    assert (dino.center == 0).all() and (ibot.center == 0).all()


def ref_ibot(student, teacher, mask, center, student_temp, teacher_temp, targets=None):
    """targets: {(image, patch): the teacher's distribution} when it is not the centred softmax."""
    per_image = []
    for i in range(len(student)):
        masked = [n for n in range(student.shape[1]) if mask[i, n]]
        q = (lambda n: softmax((teacher[i, n].detach() - center) / teacher_temp)) if targets is None \
            else (lambda n: targets[i, n])
        if masked:
            per_image.append(sum(cross_entropy(q(n), student[i, n], student_temp) for n in masked) / len(masked))
    loss = sum(per_image) / len(per_image) if per_image else student.sum() * 0
    new_center = 0.9 * center + 0.1 * teacher.detach().reshape(-1, teacher.shape[-1]).mean(0)
    return loss, new_center


def test_ibot_matches_loops_only_masked_count():
    b, n, k = 3, 5, 4
    student, teacher = leaf(b, n, k, seed=1, scale=2), leaf(b, n, k, seed=2, scale=2)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    ibot = losses.IBOTLoss(k).double()
    ibot.center.copy_(leaf(1, k, seed=3).detach()[0])
    ref, new_center = ref_ibot(student, teacher, mask, ibot.center[0].clone(), 0.1, 0.06)
    out = ibot(student, teacher, mask, 0.06)
    assert_same(out["ibot"], ref, [student])
    torch.testing.assert_close(ibot.center[0], new_center)
    (g,) = grads(ibot(student, teacher, mask, 0.06)["ibot"], [student])
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()  # unmasked patches get no gradient


def test_ibot_no_masked_patch():
    student = leaf(2, 4, 3, seed=1)
    ibot = losses.IBOTLoss(3).double()
    out = ibot(student, torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.bool), 0.04)
    assert out["ibot"].item() == 0 and torch.isfinite(out["ibot_teacher_entropy"])
    out["ibot"].backward()
    assert (student.grad == 0).all()
    assert (ibot.center != 0).all()  # the centre still follows the teacher


def ref_sinkhorn(logits, teacher_temp, n_iterations=3):
    """DINOv2's sinkhorn_knopp_teacher on (B, K) logits in one process, in its K-by-B notation."""
    Q = torch.exp(logits.detach() / teacher_temp).t()
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(1, keepdim=True) / K  # every prototype 1/K of the mass
        Q = Q / Q.sum(0, keepdim=True) / B  # every sample 1/B
    return (Q * B).t()


def test_sinkhorn_centering_matches_dinov2():
    """DINO: one Sinkhorn-Knopp over the teacher rows of both global views (DINOv2); iBOT: over
    the masked patches only, the unmasked ones get no target. The running centre stays put."""
    b, k, n = 3, 6, 5
    s_global, t_global = leaf(2 * b, k, seed=1, scale=2), leaf(2 * b, k, seed=2, scale=2)
    s_local = leaf(2 * b, k, seed=3, scale=2)
    dino = losses.DINOLoss(k, centering="sinkhorn").double()
    ref, _ = ref_dino(s_global, s_local, t_global, torch.zeros(k), 2, 0.1, 0.05, targets=ref_sinkhorn(t_global, 0.05))
    assert_same(dino(s_global, s_local, t_global, 0.05)["dino"], ref, [s_global, s_local])
    student, teacher = leaf(b, n, k, seed=4, scale=2), leaf(b, n, k, seed=5, scale=2)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    q = torch.zeros(b, n, k, dtype=torch.float64)
    q[mask] = ref_sinkhorn(teacher[mask], 0.06)
    ibot = losses.IBOTLoss(k, centering="sinkhorn").double()
    out = ibot(student, teacher, mask, 0.06)
    ref, _ = ref_ibot(student, teacher, mask, torch.zeros(k), 0.1, 0.06, targets=q)
    assert_same(out["ibot"], ref, [student])
    torch.testing.assert_close(out["ibot_teacher_entropy"],
                               -(q[mask] * q[mask].log()).sum(-1).mean())  # over the masked patches
    assert (dino.center == 0).all() and (ibot.center == 0).all()
    with pytest.raises(ValueError, match="centering"):
        losses.DINOLoss(k, centering="softmax")


def test_sinkhorn_spreads_a_collapsed_teacher():
    """A teacher that gives every image the same logits: the centred softmax (first step, centre 0)
    sends all of them to its top prototype; Sinkhorn-Knopp spreads them evenly over the prototypes."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]], dtype=torch.float64).repeat(8, 1)
    mean = losses.DINOLoss(4).double().teacher_probs(logits, 0.04)
    assert (mean[:, 0] > 0.99).all()
    sk = losses.sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(sk, torch.full((8, 4), 0.25, dtype=torch.float64))
    # bf16 logits (autocast) of 300 masked rows: computed in float32, so the count of rows (not a
    # bf16 number above 256) makes each target sum to 1
    big = (torch.rand(300, 4) * 2 - 1).bfloat16()  # cosines, as ProjectionHead gives
    sk = losses.sinkhorn_knopp(big, 0.04, rows=torch.ones(300, dtype=torch.bool))
    assert sk.dtype == torch.float32
    torch.testing.assert_close(sk.sum(1), torch.ones(300), atol=1e-5, rtol=0)


def ref_koleo(x, eps=1e-8):
    x = [v / max(v.norm(), eps) for v in x]
    total = 0
    for i in range(len(x)):
        j = max((j for j in range(len(x)) if j != i), key=lambda j: (x[i] @ x[j]).item())
        total = total - torch.log((x[i] - x[j] + eps).norm() + eps)
    return total / len(x)


def test_koleo_matches_loops_and_edge_cases():
    x = leaf(6, 5, seed=1)
    assert_same(losses.koleo_loss(x), ref_koleo(x), [x])
    one = leaf(1, 5, seed=2)
    value = losses.koleo_loss(one)
    value.backward()
    assert value.item() == 0 and (one.grad == 0).all()
    dup = leaf(1, 5, seed=3).detach().repeat(3, 1).requires_grad_()
    value = losses.koleo_loss(dup)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(dup.grad).all()


# -----------------------------------------------------------------------------------------------
# depth


def ref_depth(pred, target, mask, scales=4, grad_weight=0.5, eps=1e-6):
    """Per image: solve the 2x2 normal equations of min_{s,t} sum (s p + t - y)^2 + eps s^2 sum (p - mean p)^2
    on valid pixels (a ridge relative to the prediction's variance); then MiDaS' batch-averaged
    1/2 MSE and multi-scale gradient terms, by loops."""
    b, h, w = pred.shape
    res = torch.zeros_like(pred)
    for i in range(b):
        idx = [(u, v) for u in range(h) for v in range(w) if mask[i, u, v]]
        if not idx:
            continue
        p = torch.stack([pred[i, u, v] for u, v in idx])
        y = torch.stack([target[i, u, v] for u, v in idx])
        a = torch.stack([torch.stack([(p * p).sum() + eps * ((p - p.mean()) ** 2).sum(), p.sum()]),
                         torch.stack([p.sum(), torch.tensor(float(len(p)), dtype=p.dtype)])])
        s, _ = torch.linalg.solve(a, torch.stack([(p * y).sum(), y.sum()]))
        s = s.abs()  # the loss keeps the scale positive; the shift follows the kept scale
        t = y.mean() - s * p.mean()
        res[i] = torch.where(mask[i], s * pred[i] + t - target[i], 0)
    ssi = 0.5 * (res[mask] ** 2).sum() / max(int(mask.sum()), 1)
    grad = 0
    for k in range(scales):
        r, m = res[:, :: 2**k, :: 2**k], mask[:, :: 2**k, :: 2**k]
        total = 0
        for i in range(b):
            for u in range(r.shape[1]):
                for v in range(r.shape[2]):
                    if v + 1 < r.shape[2] and m[i, u, v] and m[i, u, v + 1]:
                        total = total + (r[i, u, v + 1] - r[i, u, v]).abs()
                    if u + 1 < r.shape[1] and m[i, u, v] and m[i, u + 1, v]:
                        total = total + (r[i, u + 1, v] - r[i, u, v]).abs()
        grad = grad + total / max(int(m.sum()), 1)
    return ssi + grad_weight * grad


def depth_inputs(b=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, target = leaf(b, h, w, seed=seed), torch.rand(b, h, w, generator=g, dtype=torch.float64)
    mask = torch.rand(b, h, w, generator=g) > 0.2
    return pred, target, mask


def test_depth_matches_loops():
    pred, target, mask = depth_inputs()
    mask[1] = False  # an image without any valid pixel contributes nothing
    out = losses.depth_loss(pred, target, mask)
    assert_same(out["depth"], ref_depth(pred, target, mask), [pred])
    torch.testing.assert_close(out["depth"], out["depth_ssi"] + 0.5 * out["depth_grad"])


def test_depth_invariant_to_scale_and_shift_of_prediction():
    pred, target, mask = depth_inputs(seed=1)
    base = losses.depth_loss(pred, target, mask)["depth"]
    # down to the variance of a fresh head and far below it (1e-4 ... 1e-10): the ridge is relative
    for a, c in [(3.0, 0.5), (0.2, -4.0), (50.0, 10.0), (1e-2, 0.3), (1e-5, 2.0)]:
        torch.testing.assert_close(losses.depth_loss(a * pred + c, target, mask)["depth"], base,
                                   rtol=1e-4, atol=0)
    perfect = losses.depth_loss(2 * target + 1, target, mask)["depth"]  # exact up to the ridge
    assert perfect.item() < 1e-5
    # an upside-down map is not rescued by a negative scale
    assert losses.depth_loss(-target, target, mask)["depth"].item() > 0.05


def test_depth_constant_maps_and_everything_masked():
    pred, target, mask = depth_inputs(seed=2)
    const = torch.full_like(pred, 0.3).requires_grad_()
    for p, y in [(const, target), (pred, torch.full_like(target, 0.7)), (const, torch.zeros_like(target))]:
        out = losses.depth_loss(p, y, mask)
        (g,) = grads(out["depth"], [p])
        assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(g).all()
    (g,) = grads(losses.depth_loss(const, target, mask)["depth"], [const])
    assert g.abs().max() < 1e-20  # a flat prediction is aligned to the target mean: no direction to move
    out = losses.depth_loss(pred, target, torch.zeros_like(mask))
    assert out["depth"].item() == 0
    out["depth"].backward()
    assert (pred.grad == 0).all()
    one = losses.depth_loss(pred[:1], target[:1], mask[:1])
    assert all(torch.isfinite(v) for v in one.values())


# -----------------------------------------------------------------------------------------------
# DDP: two gloo ranks equal one process on the full batch


def test_ddp_two_ranks_equal_one_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "ddp_losses_worker.py")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    for r in range(2):
        assert f"rank {r}: all losses equal the single-process full batch" in run.stdout, log[-4000:]
