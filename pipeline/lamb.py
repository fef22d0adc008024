"""timm's LAMB, layer-wise under DeepSpeed ZeRO-1/2.

ZeRO-1/2 replace each parameter group of the client optimizer by one flat fp32 partition per rank, with
tensors cut at partition boundaries, and step the groups one at a time. timm's Lamb would then compute one
trust ratio per partition and clip on the norm of one group's partition. Here, after
``deepspeed.initialize``, ``bind_zero_layout`` records where every tensor lies in this rank's partition
(from DeepSpeed's own record of the flat buffer); each step then sums squared norms per tensor piece,
all-reduces them over the data-parallel group (a tensor can straddle two ranks) and scales every tensor's
update by its own trust ratio. The gradient clip is not done here: ``max_grad_norm`` must be None and
DeepSpeed's ``gradient_clipping`` (a global norm at every stage) takes its place, see
``pipeline.optim.grad_clip_norm``. Everything else is timm's ``_single_tensor_lamb``, element for element.

A group that was flattened by anything else (ZeRO-3, DeepSpeed's bf16/fused fp16 wrappers) has no layout
and stops the first step with an error rather than adapting across layers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.optim import Lamb as TimmLamb

TIMM_MAX_GRAD_NORM = 1.0
"""timm's Lamb default global clip, which timm's recipes (e.g. ResNet strikes back A1-A3) train with."""


@dataclass(frozen=True)
class _FlatLayout:
    """Pieces that tile one rank's flat partition: slices of whole tensors and padding between them."""

    flat: torch.Tensor
    piece_lengths: torch.Tensor  # int64 per piece, sums to flat.numel()
    tensor_pieces: torch.Tensor  # indices of the pieces that are tensor slices
    tensor_ids: torch.Tensor  # index, in the group, of the tensor each of those pieces belongs to
    num_tensors: int
    process_group: object


class Lamb(TimmLamb):
    """timm's Lamb; under ZeRO-1/2 (after ``bind_partitions``) still one trust ratio per tensor."""

    def __init__(self, params, **kwargs):
        self._group_shapes: list[list[tuple[int, ...]]] = []
        self._layouts: dict[int, _FlatLayout] = {}
        super().__init__(params, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._group_shapes.append([tuple(p.shape) for p in self.param_groups[-1]["params"]])

    def bind_partitions(self, zero_optimizer) -> None:
        """Record this rank's partition layout from a DeepSpeed ZeRO-1/2 optimizer that wraps this one."""
        if self.defaults["max_grad_norm"] is not None:
            raise ValueError("LAMB under ZeRO: the clip must see the global gradient norm; build it with "
                             "max_grad_norm=None and set DeepSpeed's gradient_clipping instead")
        if any(group["caution"] for group in self.param_groups):
            raise ValueError("LAMB under ZeRO: caution (a per-tensor mean mask) is not supported")
        for index, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            params = self.param_groups[index]["params"]
            assert len(params) == 1 and params[0] is flat, "ZeRO's group order differs from LAMB's"
            self._layouts[id(flat)] = _partition_layout(zero_optimizer, index, flat)

    def partition_tensor_indices(self) -> list[list[int]]:
        """Per bound group: indices (in the group) of the tensors with elements in this rank's partition."""
        return [layout.tensor_ids.tolist() for layout in self._layouts.values()]

    @torch.no_grad()
    def step(self, closure=None):
        flat = [g for g in self.param_groups if len(g["params"]) == 1 and id(g["params"][0]) in self._layouts]
        if not flat:
            for group in self.param_groups:
                if [tuple(p.shape) for p in group["params"]] not in self._group_shapes:
                    raise RuntimeError(
                        "LAMB: a parameter group was replaced by flat tensors it has no layout for, so its trust "
                        "ratios would mix layers; LAMB runs at ZeRO stages 0-2 through pipeline.engine.initialize")
            return super().step(closure)
        assert len(flat) == len(self.param_groups), "a LAMB step mixes ZeRO partitions and whole tensors"
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in flat:
            self._step_partition(group, self._layouts[id(group["params"][0])])
        return loss

    def _step_partition(self, group: dict, layout: _FlatLayout) -> None:
        """timm's ``_single_tensor_lamb`` on one flat partition, with trust ratios per tensor."""
        p = layout.flat
        assert p.grad is not None, "ZeRO steps every group on every rank, with its gradient partition"
        if "step" not in group:
            group["step"] = torch.zeros((), dtype=torch.float32)
        group["step"] += 1
        step = float(group["step"])
        beta1, beta2 = group["betas"]
        beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
        bias_correction1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
        bias_correction2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
        state = self.state[p]
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], p.grad

        if beta3 == 1 - beta1:
            exp_avg.lerp_(grad, beta3)
        else:
            exp_avg.mul_(beta1).add_(grad, alpha=beta3)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (bias_correction2 ** 0.5)).add_(group["eps"])
        update = (exp_avg / bias_correction1).div_(denom)

        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay != 0:
            if group.get("decoupled_decay", False):
                max_lr = group.get("max_lr_snapshot") if group.get("corrected_weight_decay", False) else None
                wd_scale = lr if max_lr is None else lr ** 2 / max_lr
                p.add_(p, alpha=-wd_scale * weight_decay)
            else:
                update.add_(p, alpha=weight_decay)
        if weight_decay != 0 or group["always_adapt"]:
            update.mul_(_per_tensor_trust_ratios(p, update, layout, group["trust_clip"]))
        p.add_(update, alpha=-lr)


def _per_tensor_trust_ratios(weights: torch.Tensor, update: torch.Tensor, layout: _FlatLayout,
                             trust_clip: bool) -> torch.Tensor:
    """Each element's tensor's ||w|| / ||update|| (1 where either is 0, as timm), expanded over the partition."""
    piece_sq = torch.stack([
        torch.segment_reduce(weights.square(), "sum", lengths=layout.piece_lengths),
        torch.segment_reduce(update.square(), "sum", lengths=layout.piece_lengths),
    ])
    tensor_sq = torch.zeros(2, layout.num_tensors, dtype=piece_sq.dtype, device=piece_sq.device)
    tensor_sq[:, layout.tensor_ids] = piece_sq[:, layout.tensor_pieces]
    _all_reduce_sum(tensor_sq, layout.process_group)
    w_norm, u_norm = tensor_sq.sqrt()
    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)
    if trust_clip:
        ratio = ratio.clamp(max=1.0)
    piece_ratio = torch.ones(len(layout.piece_lengths), dtype=ratio.dtype, device=ratio.device)
    piece_ratio[layout.tensor_pieces] = ratio[layout.tensor_ids]
    return torch.repeat_interleave(piece_ratio, layout.piece_lengths, output_size=weights.numel())


def _all_reduce_sum(tensor: torch.Tensor, group) -> None:
    if dist.get_world_size(group=group) == 1:
        return
    if dist.get_backend(group) == "nccl" and tensor.device.type == "cpu":  # fp32 partitions offloaded to CPU
        on_device = tensor.cuda()
        dist.all_reduce(on_device, group=group)
        tensor.copy_(on_device)
    else:
        dist.all_reduce(tensor, group=group)


def _partition_layout(zero_optimizer, index: int, flat: torch.Tensor) -> _FlatLayout:
    """Tensor pieces of this rank's partition of group ``index``, from ZeRO-1/2's record of its flat buffer:
    the group's tensors in (round-robin) order, each at its recorded offset (alignment padding between
    them when parameter_alignment is on), the whole cut into equal partitions, one per rank."""
    tensors = zero_optimizer.round_robin_bit16_groups[index]
    metas = getattr(zero_optimizer, "round_robin_bit16_meta", None)  # shapes, whatever offloading did to .data
    numels = [t.numel() for t in (metas[index] if metas else tensors)]
    all_offsets = getattr(zero_optimizer, "round_robin_bit16_offsets", None)
    offsets = all_offsets[index] if all_offsets else list(itertools.accumulate([0] + numels[:-1]))
    process_group = zero_optimizer.real_dp_process_group[index]
    size = int(zero_optimizer.partition_size[index])
    start = dist.get_rank(group=process_group) * size
    assert flat.numel() == size, "ZeRO partition size differs from its flat tensor"

    lengths, tensor_pieces, tensor_ids, cursor = [], [], [], start
    for tensor_id, (offset, numel) in enumerate(zip(offsets, numels)):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if lo >= hi:
            continue
        if lo > cursor:
            lengths.append(lo - cursor)  # padding before this tensor's slice
        tensor_pieces.append(len(lengths))
        tensor_ids.append(tensor_id)
        lengths.append(hi - lo)
        cursor = hi
        if len(tensor_ids) == 1:
            assert lo - offset == zero_optimizer.first_offset[index], "partition start differs from ZeRO's"
    if cursor < start + size:
        lengths.append(start + size - cursor)  # the flat buffer's trailing alignment padding
    ours = [tensors[i] for i in tensor_ids]
    theirs = [t for t in zero_optimizer.params_in_partition[index] if t.numel() > 0]
    assert len(ours) == len(theirs) and all(a is b for a, b in zip(ours, theirs)), "partition differs from ZeRO's"

    def as_index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=flat.device)

    return _FlatLayout(flat=flat, piece_lengths=as_index(lengths), tensor_pieces=as_index(tensor_pieces),
                       tensor_ids=as_index(tensor_ids), num_tensors=len(tensors), process_group=process_group)


def bind_zero_layout(engine) -> None:
    """After ``deepspeed.initialize``: give a layer-wise Lamb inside a ZeRO-1/2 optimizer its layout."""
    zero_optimizer = engine.optimizer
    inner = getattr(zero_optimizer, "optimizer", None)
    if isinstance(inner, Lamb) and hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        inner.bind_partitions(zero_optimizer)
