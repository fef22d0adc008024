"""Contrastive losses across ranks: 2 Ray workers under a real DeepSpeed engine compute the loss and the
parameter gradients one process computes on the concatenated batch (CLIP, CLIP local loss, SigLIP, and each
with Matryoshka widths, whose features are gathered once and sliced)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ContrastiveSection, ModelSection
from pipeline.models.clip import build_clip
from pipeline.tasks.contrastive_loss import build_contrastive_loss, clamp_logit_scale, contrastive_loss

CASES = {
    "clip": ContrastiveSection(loss="clip"),
    "clip_local": ContrastiveSection(loss="clip", local_loss=True),
    "siglip": ContrastiveSection(loss="siglip"),
    "clip_matryoshka": ContrastiveSection(loss="clip", matryoshka_dims=(8, 32), matryoshka_weights=(0.5, 2.0)),
    "clip_local_matryoshka": ContrastiveSection(loss="clip", local_loss=True, matryoshka_dims=(8, 32)),
    "siglip_matryoshka": ContrastiveSection(loss="siglip", matryoshka_dims=(8, 32)),
}
BATCH_PER_RANK = 6


def _model(contrastive: ContrastiveSection) -> torch.nn.Module:
    torch.manual_seed(0)
    # The ViT tower: LayerNorm only, so a split batch sees the same per-sample function as a whole one
    # (BatchNorm statistics would differ per rank, as they do in open_clip's RN training).
    return build_clip(ModelSection(kind="clip", name="clip-tiny-vit"), contrastive)


def _batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = BATCH_PER_RANK * world_size
    images = torch.randn(n, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49407, (n, 32), generator=generator)
    texts[:, 0], texts[:, 12] = 49406, 49407  # start and end tokens; argmax(eot) pools there
    texts[:, 13:] = 0
    return images, texts


def _step_once(model, loss_fn, images, texts) -> torch.Tensor:
    outputs = model(images, texts)
    # Push the scale past its clamp too: the clamp must not break the equivalence.
    outputs["logit_scale"] = outputs["logit_scale"] * 8.0
    return contrastive_loss(loss_fn, outputs)


def worker_loop(config: dict) -> None:
    """Each rank: its slice of the batch, the distributed loss, DeepSpeed's gradient averaging."""
    import ray.train

    from pipeline.config import DeepSpeedSection, OptimSection
    from pipeline.engine import deepspeed_config, initialize

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    results = {}
    for name, contrastive in CASES.items():
        model = _model(contrastive)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        # ZeRO stage 0: DeepSpeed all-reduces and averages the gradients in backward and leaves them in .grad
        ds = deepspeed_config(DeepSpeedSection(zero_stage=0, precision="fp32"), OptimSection(), BATCH_PER_RANK, False)
        engine = initialize(model, optimizer, None, ds)
        images, texts = _batch(world)
        mine = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        loss = _step_once(engine, build_contrastive_loss(contrastive), images[mine], texts[mine])
        engine.backward(loss)
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}
        results[name] = {"loss": mean_loss.item() / world, "grads": grads}
    if rank == 0:
        torch.save(results, Path(config["out"]))


def single_process(name: str) -> dict:
    contrastive = CASES[name]
    model = _model(contrastive)
    images, texts = _batch(2)
    loss = _step_once(model, build_contrastive_loss(contrastive, rank=0, world_size=1), images, texts)
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.fixture(scope="module")
def two_worker_results(ray_session, tmp_path_factory):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # The worker function lives in this test module, which the workers cannot import: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path_factory.mktemp("loss_equivalence")
    trainer = TorchTrainer(
        worker_loop, train_loop_config={"out": str(out / "results.pt")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="loss_equivalence", storage_path=str(out)),
    )
    trainer.fit()
    return torch.load(out / "results.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process_on_the_concatenated_batch(two_worker_results, name):
    distributed, reference = two_worker_results[name], single_process(name)
    assert distributed["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert distributed["grads"].keys() == reference["grads"].keys()
    assert "logit_scale" in reference["grads"] and ("logit_bias" in reference["grads"]) == name.startswith("siglip")
    errors = {key: ((distributed["grads"][key] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)).item()
              for key, grad in reference["grads"].items()}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] < 1e-4, worst


def test_logit_scale_clamp_lets_gradient_back_into_range():
    scale = torch.tensor([150.0, 150.0, 50.0], requires_grad=True)
    clamped = clamp_logit_scale(scale)
    assert clamped.tolist() == [100.0, 100.0, 50.0]
    # d(loss)/d(scale): descent raises entry 0 further (blocked), lowers entry 1 back (passes).
    clamped.backward(torch.tensor([-1.0, 1.0, -1.0]))
    assert scale.grad.tolist() == [0.0, 1.0, -1.0]
