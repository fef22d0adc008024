"""CLIP's symmetric InfoNCE and SigLIP's sigmoid loss across ranks, from open_clip's loss classes.

Cross-rank arithmetic (why the loss is the global batch's):
  * CLIP, gather_with_grad: every rank gathers all ranks' features with gradients
    (torch.distributed.nn.all_gather) and computes the loss of the whole global micro-batch; the
    gather's backward sums each rank's share back to its owner, and DeepSpeed's gradient averaging
    over ranks then yields exactly the gradient of that global loss.
  * CLIP, local_loss: each rank scores only its own images/texts against all gathered ones (N/W x N
    logits instead of N x N); the mean of the ranks' losses is the global loss, and again the averaged
    gradients are its gradient.
  * SigLIP: each rank sums its images against its own texts and then every other rank's texts
    (exchanged with gradients), divided by the local batch; the mean over ranks is the global loss.
The contrastive batch is therefore the global micro-batch (data.batch_size_per_rank x ranks).
Gradient accumulation adds the gradients of separate micro-batch losses: it does NOT enlarge the
contrastive batch (negatives never cross micro-batches).
"""
from __future__ import annotations

import open_clip
import torch
import torch.distributed as dist
from open_clip.loss import SigLipLoss

# open_clip_train clamps the logit scale to [0, ln 100] after every optimizer step.
MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = 1.0, 100.0


class _ClampTowardRange(torch.autograd.Function):
    """Clamp whose gradient still passes when a descent step would move the value back into range.

    open_clip clamps the parameter in place after each step. Under DeepSpeed ZeRO the optimizer
    updates its own fp32 master partitions and copies them over the module's parameters, so an in-place
    clamp of the module parameter would be undone at the next step. Clamping the value the loss sees
    gives the same forward; letting the gradient through when it points back into range (projected
    gradient descent) keeps the parameter from sticking beyond the bound, so it behaves like the
    in-place clamp with at most an optimizer-momentum overshoot of the raw parameter.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(value)
        ctx.low, ctx.high = low, high
        return value.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (value,) = ctx.saved_tensors
        # A descent step moves value by -grad: block only the directions that leave the range further.
        blocked = ((value > ctx.high) & (grad < 0)) | ((value < ctx.low) & (grad > 0))
        return grad.masked_fill(blocked, 0.0), None, None


def clamp_logit_scale(scale: torch.Tensor) -> torch.Tensor:
    """The exp'd logit scale the model returns, limited to [1, 100] (ln range [0, ln 100])."""
    return _ClampTowardRange.apply(scale, MIN_LOGIT_SCALE, MAX_LOGIT_SCALE)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def siglip_exchange(backend: str | None) -> str:
    """open_clip's neighbour exchange ('bidir', P2P) where the backend has it; all_gather elsewhere."""
    # gloo (CPU) lacks the batched P2P ops the 'bidir' exchange uses; the gathered form is equivalent.
    return "bidir" if backend == "nccl" else "gather"


def build_contrastive_loss(contrastive_cfg, rank: int | None = None, world_size: int | None = None) -> torch.nn.Module:
    """open_clip's ClipLoss or SigLipLoss for this process's rank (default: torch.distributed's)."""
    if rank is None or world_size is None:
        rank, world_size = _world()
    if contrastive_cfg.loss == "clip":
        return open_clip.ClipLoss(local_loss=contrastive_cfg.local_loss, gather_with_grad=contrastive_cfg.gather_with_grad,
                                  cache_labels=True, rank=rank, world_size=world_size)
    if contrastive_cfg.loss == "siglip":
        backend = dist.get_backend() if world_size > 1 and dist.is_initialized() else None
        return SigLipLoss(rank=rank, world_size=world_size, dist_impl=siglip_exchange(backend))
    raise ValueError(f"contrastive.loss: unknown loss {contrastive_cfg.loss!r} (valid: clip, siglip)")


def contrastive_loss(loss_fn: torch.nn.Module, outputs: dict) -> torch.Tensor:
    """Loss of one micro-batch from the model's output dict (features are already L2-normalised)."""
    scale = clamp_logit_scale(outputs["logit_scale"].float())
    bias = outputs.get("logit_bias")
    image, text = outputs["image_features"].float(), outputs["text_features"].float()
    if isinstance(loss_fn, SigLipLoss):
        if bias is None:
            raise ValueError("contrastive.loss siglip needs a model with a logit bias")
        return loss_fn(image, text, scale, bias.float())
    # A CLIP loss on a model that has a bias (a SigLIP checkpoint) uses it, as open_clip_train does.
    return loss_fn(image, text, scale, None if bias is None else bias.float())

