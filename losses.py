"""The four MTV objectives: clip (SigLIP), ssl (DINO + iBOT, KoLeo), depth (MiDaS-style), ground.

Every loss takes this rank's tensors and returns a dict of scalars: the key named after the task is
the term to weight and backpropagate, the other keys are detached diagnostics of this rank's
batch for the logs. koleo_loss, a regulariser added to ssl rather than a task, returns a scalar.

Distributed training: DDP *averages* gradients over ranks, so the objective it optimises is the
mean over ranks of what each rank returns. Each loss therefore returns

    world * (sum of this rank's per-item losses) / (number of items in the global batch)

whose mean over ranks is exactly the loss of one process on the whole batch, even when ranks hold
different numbers of items (regions per image, masked patches, valid pixels). All collectives go
through the helpers below, which are no-ops when torch.distributed is not initialised.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------------------------
# Collectives (no-ops at world size 1)


def world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world() > 1 else 0


def all_reduce_sum(x):
    """Sum of x over ranks, without gradient (counts, centres, logged values)."""
    x = x.detach().clone()
    if world() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Mean of x over ranks, without gradient."""
    return all_reduce_sum(x) / world()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward is the matching reduce-scatter: each rank's slice receives the sum,
    over ranks, of the gradients every rank's loss sends to it. (Written out with all_reduce,
    which gloo supports; torch.distributed.nn.functional.all_gather does the same but is deprecated.)"""

    @staticmethod
    def forward(ctx, x):  # (n, ...) with the same n on every rank
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * n, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world())[rank()]


def _rank_counts(n, device=None):
    """[n on rank 0, n on rank 1, ...]: how many rows each rank holds."""
    if world() == 1:
        return [n]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([n], device=device))
    return [int(c) for c in counts]


def all_gather_with_grad(x):
    """(n_r, ...) on rank r -> (sum_r n_r, ...) in rank order, with gradients flowing back to every
    rank's rows. Ranks may hold different n_r (regions per batch): pad to the largest, gather, strip."""
    if world() == 1:
        return x
    counts = _rank_counts(len(x), x.device)
    if max(counts) == 0:
        return x  # nothing anywhere: (0, ...) is already the gathered result
    pad = x.new_zeros((max(counts) - len(x), *x.shape[1:]))
    full = _AllGather.apply(torch.cat([x, pad]))  # (world * max_n, ...)
    return torch.cat([part[:n] for part, n in zip(full.chunk(world()), counts)])


def _share_of_mean(total, count):
    """This rank's share of a global-batch mean: world * total / (count summed over ranks).
    An empty global batch gives 0 with the graph kept, so backward still runs."""
    if not torch.is_tensor(count):  # a python int: torch.full writes it on the device without a host wait
        count = torch.full((), count, dtype=total.dtype, device=total.device)
    count = all_reduce_sum(count.to(total.dtype))
    return total * world() / count.clamp(min=1)


def _masked_mean(x, m):
    """Mean of x where m is True, 0 when m is empty (for diagnostics; detached)."""
    return (x.detach() * m).sum() / m.sum().clamp(min=1)


# -----------------------------------------------------------------------------------------------
# clip: SigLIP sigmoid loss


def siglip_loss(img, txt, scale, bias):
    """Sigmoid image-text loss (SigLIP). img, txt: (B, D), L2-normalised, this rank's batch;
    scale (exp'd) and bias: scalars.

    Text embeddings from every rank are gathered *with* gradients (MTV's choice over SigLIP's
    chunked ring), so each image sees all B * world captions as candidates while only the local
    (B, B * world) logit block is materialised. SigLIP normalises by the number of images.
    """
    txt_all = all_gather_with_grad(txt)  # (B_all, D)
    logits = scale * img @ txt_all.T + bias  # (B, B_all)
    mine = torch.arange(len(img), device=img.device)
    own = mine + sum(_rank_counts(len(img), img.device)[: rank()])  # this rank's captions in txt_all
    pos = torch.zeros_like(logits, dtype=torch.bool)
    pos[mine, own] = True
    labels = 2 * pos.to(logits.dtype) - 1  # +1 for the matching caption, -1 for every other one
    loss = -F.logsigmoid(labels * logits).sum()
    return {"clip": _share_of_mean(loss, len(img)),
            "clip_pos_logit": _masked_mean(logits, pos),
            "clip_neg_logit": _masked_mean(logits, ~pos),
            "clip_acc": (logits.detach().argmax(1) == own).to(logits.dtype).mean()}


# -----------------------------------------------------------------------------------------------
# ssl: DINO on the pooled token over multi-crop views, iBOT on masked patches, KoLeo


def teacher_temp_schedule(step, warmup_steps, start=0.04, end=0.07):
    """Teacher temperature: linear from start to end over warmup_steps, then end (DINO warms up
    0.04 -> 0.07: a hot teacher early on collapses, above ~0.07 training is unstable)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def _entropy_each(p):
    """Entropy of each distribution p (..., K) -> (...), in nats; detached."""
    return -(p * p.clamp(min=1e-12).log()).sum(-1).detach()


def _entropy(p):
    """Mean entropy of the distributions p (..., K), in nats; detached (collapse monitor)."""
    return _entropy_each(p).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher, teacher_temp, rows=None, n_iterations=3):
    """DINOv2's alternative to the running centre (Sinkhorn-Knopp, from SwAV): the teacher's
    targets for (..., K) logits as a transport plan in which, over the global batch, every
    prototype receives the same mass and every row sums to 1, so that no few prototypes can take
    the whole batch. rows (...,) bool: only these take part (iBOT: the masked patches, as
    DINOv2); the others get all-zero targets. Three iterations, as DINOv2. Our logits are
    cosines (ProjectionHead), so exp(logit / temperature) cannot overflow in float32."""
    shape = teacher.shape
    x = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32))  # bf16: counts stay exact
    q = torch.exp(x.reshape(-1, shape[-1]) / teacher_temp)  # (n, K)
    w = q.new_ones(len(q)) if rows is None else rows.reshape(-1).to(q.dtype)  # which rows take part
    q = q * w[:, None]
    n = all_reduce_sum(w.sum())  # rows over the global batch
    tiny = torch.finfo(q.dtype).tiny  # an empty row (or batch) stays 0 instead of 0 / 0
    q = q / all_reduce_sum(q.sum()).clamp(min=tiny)
    for _ in range(n_iterations):
        q = q / all_reduce_sum(q.sum(0, keepdim=True)).clamp(min=tiny) / shape[-1]  # each prototype 1/K
        q = q / q.sum(1, keepdim=True).clamp(min=tiny) / n.clamp(min=1)  # each row 1/n
    return (q * n).reshape(shape)


class _CenteredTeacher(nn.Module):
    """What DINO and iBOT share: the teacher's softmax is centred (minus a running mean of its
    logits) and sharpened (low temperature). The two pull in opposite directions and together
    avoid collapse (DINO, Sec. 3.1): centring alone flattens, sharpening alone collapses.
    centering="sinkhorn" replaces the running centre by DINOv2's Sinkhorn-Knopp (sinkhorn_knopp):
    the centre then stays where it is, unused."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, centering="mean"):
        super().__init__()
        if centering not in ("mean", "sinkhorn"):
            raise ValueError(f"centering must be mean or sinkhorn, not {centering!r}")
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K), saved with state_dict

    def teacher_probs(self, teacher, teacher_temp, rows=None):
        """(..., K) teacher logits -> centred, sharpened probabilities (rows: see sinkhorn_knopp;
        the running centre serves every row). Stop-gradient: the teacher only moves through the
        EMA of the student's weights."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher, teacher_temp, rows)
        return F.softmax((teacher.detach() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher):
        """center <- m * center + (1 - m) * mean teacher logit over the global batch, after the loss
        has used the old centre (as DINO). teacher: (..., K), all leading dims are averaged.
        Only in training mode, like BatchNorm's running statistics: validation leaves it alone."""
        if not self.training or self.centering == "sinkhorn":
            return
        rows = teacher.reshape(-1, teacher.shape[-1])  # (n, K)
        mean = all_reduce_sum(rows.sum(0, keepdim=True)) / sum(_rank_counts(len(rows), rows.device))
        self.center.mul_(self.center_momentum).add_(mean * (1 - self.center_momentum))


class DINOLoss(_CenteredTeacher):
    """DINO self-distillation over multi-crop views: the student, seeing any view, predicts the
    teacher's distribution for each of the other global views. n_global: global views G (2)."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, n_global=2, centering="mean"):
        super().__init__(out_dim, student_temp, center_momentum, centering)
        self.n_global = n_global

    def forward(self, student_global, student_local, teacher_global, teacher_temp):
        """student_global: (G*B, K) logits, view-major (all view 0 first); student_local: (L*B, K)
        or None; teacher_global: (G*B, K) from the same global views.

        Cross-entropy for every (teacher view, student view) pair except a view with itself,
        averaged over the G * (G + L) - G pairs and the batch. Then the centre is updated."""
        b = len(teacher_global) // self.n_global
        student = student_global if student_local is None else torch.cat([student_global, student_local])
        log_p = F.log_softmax(student / self.student_temp, dim=-1).split(b)  # G + L views of (B, K)
        q = self.teacher_probs(teacher_global, teacher_temp).split(b)  # G views of (B, K)
        total, n_pairs = 0, 0
        for t, q_t in enumerate(q):
            for s, log_p_s in enumerate(log_p):
                if s != t:  # a view is not asked to predict itself
                    total = total - (q_t * log_p_s).sum()
                    n_pairs += 1
        loss = _share_of_mean(total, n_pairs * b)
        self.update_center(teacher_global)
        return {"dino": loss, "dino_teacher_entropy": _entropy(torch.cat(q))}


class IBOTLoss(_CenteredTeacher):
    """iBOT masked image modelling: the student sees view 1 with some patches replaced by a mask
    token and predicts, at each masked position, the teacher's distribution for the unmasked patch.
    The patch head has its own centre."""

    def forward(self, student_patch, teacher_patch, mask, teacher_temp):
        """student_patch, teacher_patch: (B, N, K) patch logits; mask: (B, N) bool, True = masked.

        Only masked positions count. As in iBOT, the loss is averaged over the masked patches of
        each image first (an image with many masked patches does not weigh more); unlike iBOT,
        which then averages over all images, we average over the images with at least one masked
        patch, so the loss does not shrink with the share of images left unmasked."""
        q = self.teacher_probs(teacher_patch, teacher_temp, rows=mask)  # (B, N, K)
        ce = -(q * F.log_softmax(student_patch / self.student_temp, dim=-1)).sum(-1)  # (B, N)
        m = mask.to(ce.dtype)
        per_image = (ce * m).sum(1) / m.sum(1).clamp(min=1)  # (B,), 0 for an image without mask
        loss = _share_of_mean(per_image.sum(), mask.any(1).sum())
        self.update_center(teacher_patch)
        # Sinkhorn gives the unmasked patches no target, so its entropy is over the masked ones
        entropy = _entropy(q) if self.centering == "mean" else _masked_mean(_entropy_each(q), m)
        return {"ibot": loss, "ibot_teacher_entropy": entropy}


def koleo_loss(x, eps=1e-8):
    """KoLeo regulariser (DINOv2): -mean log distance of each L2-normalised row of x (B, D) to its
    nearest neighbour in the batch, which spreads features out. Computed within this rank's batch,
    as in DINOv2. Returns a scalar: 0 for B < 2 (no neighbour); duplicates give a large finite
    value (the eps inside the distance keeps log and gradient finite)."""
    if len(x) < 2:
        return x.sum() * 0.0
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T  # (B, B) cosine similarity
        dots.fill_diagonal_(-2.0)  # below any real similarity: a row is not its own neighbour
        nearest = dots.argmax(1)  # (B,)
    distance = F.pairwise_distance(x, x[nearest], eps=eps)  # (B,) = |x_i - x_nn + eps|
    return -torch.log(distance + eps).mean()


# -----------------------------------------------------------------------------------------------
# depth: scale-and-shift-invariant loss + multi-scale gradient matching (MiDaS)


def depth_loss(pred, target, mask, scales=4, grad_weight=0.5, eps=1e-6):
    """pred, target: (B, H, W) relative inverse depth; mask: (B, H, W) bool, True = valid label.

    Relative depth has no scale or shift, so each prediction is first aligned to its target by
    least squares on the valid pixels, s * pred + t (MiDaS' ScaleAndShiftInvariantLoss). We chose
    least squares over the median/MAD normalisation because it is exactly how zero-shot relative
    depth is evaluated, so the loss measures what the benchmark scores. Then, as MiDaS:
      depth_ssi  = sum of squared aligned residuals / (2 * valid pixels)
      depth_grad = sum over `scales` (strides 1, 2, 4, ...) of the L1 norm of the x and y gradients
                   of the aligned residual at valid pixel pairs / valid pixels at that scale,
    both averaged over the valid pixels of the global batch; depth = ssi + grad_weight * grad.

    The scale is kept positive (|s|), so an inverted prediction is penalised, not flipped.
    A ridge eps on the scale, relative to the prediction's own variance, keeps the loss exactly
    invariant to the prediction's scale (an absolute ridge stops being so once a prediction's
    variance nears it, as a fresh head's does); a constant prediction gets s = 0 (it is replaced
    by the target mean, zero gradient); an image without valid pixels contributes nothing."""
    m = mask.to(pred.dtype)
    n = m.sum((1, 2)).clamp(min=1)[:, None, None]  # (B, 1, 1) valid pixels per image
    p_mean = (m * pred).sum((1, 2), keepdim=True) / n  # (B, 1, 1)
    y_mean = (m * target).sum((1, 2), keepdim=True) / n
    pc, yc = m * (pred - p_mean), m * (target - y_mean)  # centred on the valid pixels
    # Centred normal equations: s = cov(p, y) / (var(p) (1 + eps)), t = mean(y) - s * mean(p). The
    # scale is taken as |s|: a free sign would let an upside-down map (far = large) score as well as
    # the right one, and "larger = nearer" would then be a coin flip of the initialisation. The
    # floor only keeps 0 / 0 finite for an exactly constant prediction.
    var = (pc * pc).sum((1, 2), keepdim=True)
    s = (pc * yc).sum((1, 2), keepdim=True).abs() / (var * (1 + eps)).clamp(min=1e-30)
    res = m * (s * (pred - p_mean) + y_mean - target)  # (B, H, W) aligned residual, 0 where invalid
    ssi = _share_of_mean(0.5 * (res * res).sum(), m.sum())
    grad = 0.0
    for k in range(scales):
        r, v = res[:, :: 2**k, :: 2**k], m[:, :: 2**k, :: 2**k]  # (B, H/2^k, W/2^k)
        gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * v[:, :, 1:] * v[:, :, :-1]  # both pixels valid
        gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * v[:, 1:, :] * v[:, :-1, :]
        grad = grad + _share_of_mean(gx.sum() + gy.sum(), v.sum())
    return {"depth": ssi + grad_weight * grad, "depth_ssi": ssi.detach(), "depth_grad": grad.detach()}


# -----------------------------------------------------------------------------------------------
# ground: sigmoid loss between region embeddings and entity-name embeddings


def ground_loss(region, name, name_id, scale, bias):
    """region: (R, D) region embeddings, name: (R, D) embeddings of each region's entity name,
    name_id: (R,) int64 id of the name (equal names -> equal ids, across ranks); all L2-normalised,
    this rank's regions; scale (exp'd) and bias: scalars.

    The SigLIP loss with regions in place of images: every region is scored against the names of
    all regions in the global batch (gathered with gradients; ranks may hold different R), and
    every name with the region's own id is a positive, so two "red cube" boxes do not push each
    other's names away. Normalised by the number of regions; no region anywhere gives 0."""
    names = all_gather_with_grad(name)  # (R_all, D)
    ids = all_gather_with_grad(name_id)  # (R_all,)
    logits = scale * region @ names.T + bias  # (R, R_all)
    pos = name_id[:, None] == ids[None, :]  # (R, R_all)
    labels = 2 * pos.to(logits.dtype) - 1
    loss = -F.logsigmoid(labels * logits).sum()
    return {"ground": _share_of_mean(loss, len(region)),
            "ground_pos_logit": _masked_mean(logits, pos),
            "ground_neg_logit": _masked_mean(logits, ~pos)}
