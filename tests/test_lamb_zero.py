"""LAMB under ZeRO: 2 gloo ranks under a real DeepSpeed engine (our generated config) end with the weights
that one process running timm's Lamb reaches on the concatenated batch, at every ZeRO stage the config
accepts. ZeRO-1/2 hand the optimizer one flat partition per rank and parameter group, with tensors cut at
the partition boundary: trust ratios and the gradient clip must still be per tensor and global."""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from timm.optim import Lamb as TimmLamb

from pipeline.config import ConfigError, DeepSpeedSection, OptimSection, load_config
from pipeline.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
BATCH_PER_RANK = 4
STEPS = 5
LOSS_SCALE = 20.0  # large gradients early on, so the global clip at 1.0 is exercised
OPTIM = OptimSection(name="lamb", lr=0.02, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-6)

# name: (ZeRO stage, optim.grad_clip_norm, deepspeed.extra, resume from a checkpoint at this step or None)
CASES = {
    "zero0": (0, None, {}, None),
    "zero1": (1, None, {}, None),
    "zero2": (2, None, {}, None),
    "zero1_clip_0.5": (1, 0.5, {}, None),
    # Padding between parameters and a reordered flat buffer: the layout comes from DeepSpeed's own record.
    "zero2_aligned_round_robin": (2, None, {"zero_optimization": {"parameter_alignment": True,
                                                                  "round_robin_gradients": True}}, None),
    # A fresh engine that loads the partitions and LAMB's state keeps its layout.
    "zero1_resumed": (1, None, {}, 2),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # No BatchNorm: a split batch then sees the same per-sample function as the whole one. Odd sizes, so
    # tensors straddle the partition boundary and (with parameter_alignment) padding sits between them.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.GroupNorm(2, 6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 5, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(5 * 2 * 2, 13),
        torch.nn.LayerNorm(13), torch.nn.GELU(), torch.nn.Linear(13, 7),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS, WORLD_SIZE * BATCH_PER_RANK, 3, 6, 6, generator=generator)
    labels = torch.randint(0, 7, (STEPS, WORLD_SIZE * BATCH_PER_RANK), generator=generator)
    return images, labels


def _loss(model, images, labels) -> torch.Tensor:
    return LOSS_SCALE * torch.nn.functional.cross_entropy(model(images), labels)


def _optim(grad_clip_norm) -> OptimSection:
    return dataclasses.replace(OPTIM, grad_clip_norm=grad_clip_norm)


def _engine(stage: int, clip, extra: dict):
    from pipeline.engine import deepspeed_config, initialize

    optim_cfg = _optim(clip)
    model = _model()
    optimizer = build_optimizer(param_groups(model, optim_cfg.weight_decay), optim_cfg)
    ds_cfg = DeepSpeedSection(zero_stage=stage, precision="fp32", extra=extra)
    return initialize(model, optimizer, None, deepspeed_config(ds_cfg, optim_cfg, BATCH_PER_RANK, False))


def _train(engine, rank: int, steps: range) -> None:
    images, labels = _data()
    mine = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    for step in steps:
        engine.backward(_loss(engine, images[step, mine], labels[step, mine]))
        engine.step()


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for name, (stage, clip, extra, resume_at) in CASES.items():
        engine = _engine(stage, clip, extra)
        _train(engine, rank, range(resume_at or STEPS))
        if resume_at:
            engine.save_checkpoint(str(Path(out_dir) / name), tag="resume")
            engine = _engine(stage, clip, extra)
            engine.load_checkpoint(str(Path(out_dir) / name), tag="resume")
            _train(engine, rank, range(resume_at, STEPS))
        # ZeRO-1/2 all-gather the updated partitions: every rank holds the full weights.
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        layout = engine.optimizer.optimizer.partition_tensor_indices() if stage else None
        results[name] = {"weights": weights, "tensors_in_partition": layout}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lamb_zero")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _timm_reference(grad_clip_norm) -> tuple[dict, list[float]]:
    """One process, plain timm Lamb (its own global clip at max_grad_norm=1.0), the concatenated batch."""
    optim_cfg = _optim(grad_clip_norm)
    model = _model()
    optimizer = TimmLamb(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=optim_cfg.betas,
                         eps=optim_cfg.eps)
    images, labels = _data()
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad()
        _loss(model, images[step], labels[step]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm or float("inf"))
        norms.append(norm.item())
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


@pytest.mark.parametrize("case", list(CASES))
def test_two_zero_ranks_match_timm_lamb_on_the_concatenated_batch(two_rank_results, case):
    reference, grad_norms = _timm_reference(CASES[case][1])
    assert max(grad_norms) > 1.0  # the clip was active at least once
    for rank_results in two_rank_results:
        weights = rank_results[case]["weights"]
        assert weights.keys() == reference.keys()
        errors = {n: ((weights[n] - w).abs().max() / w.abs().max()).item() for n, w in reference.items()}
        worst = max(errors.items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:4]


def test_zero_partitions_cut_tensors(two_rank_results):
    """The ZeRO cases are meaningful: some tensor is split between the two ranks' partitions."""
    for case in ("zero1", "zero2", "zero2_aligned_round_robin"):
        per_rank = [results[case]["tensors_in_partition"] for results in two_rank_results]
        decay_group = [set(groups[0]) for groups in per_rank]
        assert decay_group[0] & decay_group[1], (case, per_rank)


def test_lamb_refuses_a_flat_group_it_has_no_layout_for():
    model = _model()
    optimizer = build_optimizer(param_groups(model, OPTIM.weight_decay), OPTIM)
    flat = torch.cat([p.detach().reshape(-1) for p in optimizer.param_groups[0]["params"]]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    optimizer.param_groups[0]["params"] = [flat]  # what ZeRO and DeepSpeed's bf16/fp16 wrappers do
    with pytest.raises(RuntimeError, match="no layout"):
        optimizer.step()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_accepts_lamb_only_where_it_is_layer_wise(stage):
    overrides = [f"deepspeed.zero_stage={stage}"]
    if stage < 3:
        assert load_config(REPO / "configs" / "resnet50_a3.yaml", overrides).deepspeed.zero_stage == stage
        return
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "resnet50_a3.yaml", overrides)
    assert err.value.key == "deepspeed.zero_stage" and "resnet50_a3.yaml" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("version, stage, world, accelerator, refused", [
    ("0.19.7", 1, 2, "cpu", True),
    ("0.19.7", 2, 2, "cpu", True),
    ("0.19.7", 0, 2, "cpu", False),  # stage 0 all-reduces through the engine, not ZeRO's buckets
    ("0.19.7", 1, 1, "cpu", False),  # nothing to reduce
    ("0.19.7", 2, 2, "cuda", False),  # "torch.cuda.FloatTensor" matched: only CPU tensors were dropped
    ("0.19.8", 2, 2, "cpu", False),
])
def test_deepspeed_that_drops_cpu_zero_gradients_is_refused(version, stage, world, accelerator, refused):
    from pipeline.engine import check_zero_reduces_gradients

    if refused:
        with pytest.raises(RuntimeError, match=r"deepspeed>=0\.19\.8"):
            check_zero_reduces_gradients(version, stage, world, accelerator)
    else:
        check_zero_reduces_gradients(version, stage, world, accelerator)
