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
Matryoshka (contrastive.matryoshka_dims, MatryoshkaLoss below) gathers the full-width features once and
slices the gathered copies, so the communication per step is the plain loss's whatever the number of widths.
Gradient accumulation adds the gradients of separate micro-batch losses: it does NOT enlarge the
contrastive batch (negatives never cross micro-batches).
"""
from __future__ import annotations

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss, gather_features

from pipeline.models.clip import normalized_prefix

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
    """open_clip's ClipLoss or SigLipLoss for this process's rank (default: torch.distributed's), inside a
    MatryoshkaLoss when contrastive.matryoshka_dims is set."""
    base = _open_clip_loss(contrastive_cfg, rank, world_size)
    if not contrastive_cfg.matryoshka_dims:
        return base
    return MatryoshkaLoss(base, contrastive_cfg.matryoshka_dims, contrastive_cfg.matryoshka_weights)


def _open_clip_loss(contrastive_cfg, rank: int | None, world_size: int | None) -> torch.nn.Module:
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
    if isinstance(getattr(loss_fn, "base", loss_fn), SigLipLoss):
        if bias is None:
            raise ValueError("contrastive.loss siglip needs a model with a logit bias")
        return loss_fn(image, text, scale, bias.float())
    # A CLIP loss on a model that has a bias (a SigLIP checkpoint) uses it, as open_clip_train does.
    return loss_fn(image, text, scale, None if bias is None else bias.float())



class MatryoshkaLoss(torch.nn.Module):
    """Matryoshka representation learning (Kusupati et al. 2022) on open_clip's losses: the loss at the full
    embedding width plus, weighted, the same loss on each nested prefix of the embeddings (renormalised), so
    the first D dims of an embedding are an embedding of their own (`launch eval ... --embed-dim D`).

    One logit scale (and SigLIP bias) serves every width: the prefixes are views of one embedding, and a
    temperature per width would be extra parameters open_clip models and exports do not have.
    Across ranks the full-width features are gathered once (as the open_clip loss would) and every width
    slices the gathered copies; with one rank each width is exactly the open_clip loss on the sliced
    features.
    """

    def __init__(self, base: torch.nn.Module, dims: tuple[int, ...], weights: tuple[float, ...] | None = None):
        super().__init__()
        assert isinstance(base, (ClipLoss, SigLipLoss)), type(base)
        self.base = base
        self.dims = tuple(dims)
        self.weights = tuple(weights) if weights is not None else (1.0,) * len(self.dims)
        self.last_losses: dict[int, torch.Tensor] = {}
        """Width -> that width's loss (detached) in the latest call: the per-width train metrics."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        full = image.shape[-1]
        gathered = _gather_once(self.base, image, text)
        losses = {width: _width_loss(self.base, image, text, gathered, width if width < full else None,
                                     logit_scale, logit_bias)
                  for width in (full, *self.dims)}
        self.last_losses = {width: loss.detach() for width, loss in losses.items()}
        return losses[full] + sum(weight * losses[dim] for dim, weight in zip(self.dims, self.weights))


def _gather_once(base: torch.nn.Module, image: torch.Tensor, text: torch.Tensor):
    """The other ranks' features the open_clip loss would fetch: (all images, all texts) for ClipLoss, every
    rank's texts (a list) for SigLIP; None with one rank. SigLIP's neighbour exchange is replaced by one
    all_gather with gradients: the same volume per rank, and open_clip's own 'gather' implementation."""
    if base.world_size == 1:
        return None
    if isinstance(base, ClipLoss):
        return gather_features(image, text, local_loss=base.local_loss, gather_with_grad=base.gather_with_grad,
                               rank=base.rank, world_size=base.world_size)
    return torch.distributed.nn.all_gather(text)


def _width_loss(base, image, text, gathered, width: int | None, scale, bias) -> torch.Tensor:
    """The open_clip loss at one width (None: full, features as the model normalised them)."""
    def cut(features: torch.Tensor) -> torch.Tensor:
        return features if width is None else normalized_prefix(features, width)

    if gathered is None:
        return base(cut(image), cut(text), scale, bias)
    if isinstance(base, SigLipLoss):  # SigLipLoss.forward, dist_impl 'gather', on pre-gathered texts
        own = cut(image)
        return sum(_siglip_block(base, own, cut(texts), scale, bias, negative_only=i != base.rank)
                   for i, texts in enumerate(gathered))
    all_image, all_text = map(cut, gathered)  # ClipLoss.get_logits and forward on pre-gathered features
    if base.local_loss:
        logits_per_image = scale * cut(image) @ all_text.T
        logits_per_text = scale * cut(text) @ all_image.T
    else:
        logits_per_image = scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
    if bias is not None:
        logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
    labels = base.get_ground_truth(image.device, logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _siglip_block(base: SigLipLoss, image, text, scale, bias, negative_only: bool) -> torch.Tensor:
    logits = base.get_logits(image, text, scale, bias)
    labels = base.get_ground_truth(image.device, image.dtype, image.shape[0], negative_only=negative_only)
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]
