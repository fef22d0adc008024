"""CLIP pieces without Ray: image-text shards (img2dataset layout, bad samples counted), weighted
mixing, LiT locking, weight-decay groups, pretrained loading."""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pipeline.config import ContrastiveSection, DataSection, ModelSection
from pipeline.data import reasons
from pipeline.data.image_text import image_text_loader
from pipeline.data.mixing import MixedStream, SourceMix
from pipeline.data.shards import Shard, resolve_shards
from pipeline.models.clip import CLIP_CONFIG_DIR, build_clip, get_tokenizer
from pipeline.tasks.contrastive_loss import build_contrastive_loss, contrastive_loss

DATA = DataSection(image_size_px=32, val_crop_pct=1.0, num_workers_per_rank=0, shuffle_buffer=8)


class Payload:
    """Stands for arbitrary pickled code inside a weights file."""


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_img2dataset_shard(path: Path, samples: list[dict]) -> None:
    """img2dataset's layout: 9-digit keys, KEY.jpg + KEY.txt + KEY.json (url, caption, key, status)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path)) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{i:09d}", **sample})


def meta(i: int, caption: str | None) -> bytes:
    return json.dumps({"url": f"http://x/{i}.jpg", "caption": caption, "key": f"{i:09d}", "status": "success",
                       "width": 40, "height": 40}).encode()


def test_img2dataset_shards_read_with_bad_samples_skipped_and_counted(tmp_path):
    good = [{"jpg": jpeg(i), "txt": f"a photo number {i}".encode(), "json": meta(i, f"a photo number {i}")}
            for i in range(5)]
    bad = [
        {"jpg": jpeg(10), "json": meta(10, "caption only in the json")},  # read from json: not bad
        {"jpg": jpeg(11), "json": meta(11, None)},  # no caption anywhere
        {"jpg": jpeg(12), "txt": b"   \n"},  # empty caption
        {"jpg": b"not a jpeg", "txt": b"a corrupt image"},
        {"txt": b"a caption without an image"},
    ]
    write_img2dataset_shard(tmp_path / "00000.tar", good + bad)
    tokenizer = get_tokenizer("clip-tiny-rn")
    loader = image_text_loader([resolve_shards(str(tmp_path))], DATA, tokenizer, rank=0, world_size=1, seed=0,
                               training=False, batch_size=16)
    images, texts, skipped = [], [], Counter()
    for item in loader:
        pixels, tokens = item.batch
        images.append(pixels)
        texts.append(tokens)
        skipped.update(item.skips)
    tokens = torch.cat(texts)
    assert torch.cat(images).shape == (6, 3, 32, 32) and tokens.shape == (6, 32)
    assert torch.equal(tokens[0], tokenizer(["a photo number 0"])[0])
    assert torch.equal(tokens[5], tokenizer(["caption only in the json"])[0])
    assert skipped == {reasons.NO_CAPTION: 1, reasons.EMPTY_CAPTION: 1, reasons.CORRUPT_IMAGE: 1,
                       reasons.NO_IMAGE: 1}


def test_weighted_mixing_draws_sources_in_proportion_and_each_source_once_per_epoch():
    sources = [[Shard("a.tar", 50)], [Shard("b.tar", 30)], [Shard("c.tar", 20)]]
    mix = SourceMix(sources, (6.0, 3.0, 1.0), seed=0, shuffle_window=8)
    drawn = [mix.source_of(p) for p in range(3 * 4096)]
    share = np.bincount([s for s, _ in drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(share, [0.6, 0.3, 0.1], atol=0.015)
    for source in range(3):  # a source's own stream advances one sample per draw, never repeating
        assert [i for s, i in drawn if s == source] == list(range(int(share[source] * len(drawn))))
    # a source's epoch visits each of its samples once
    first_epoch = [mix.locate(p) for p in range(2000) if mix.source_of(p)[1] < 30 and mix.source_of(p)[0] == 1]
    assert sorted(index for _, _, index in first_epoch) == list(range(30))


def test_mixed_stream_reads_shards_by_weight_and_resumes_at_the_next_batch(tmp_path):
    sources = []
    for name, count in (("big", 40), ("small", 10)):
        path = tmp_path / name / "00000.tar"
        write_img2dataset_shard(path, [{"txt": f"{name} {i}".encode()} for i in range(count)])
        sources.append(resolve_shards(str(path.parent)))
    decode = lambda raw: raw["txt"].decode().split()[0]  # noqa: E731 - the source's name

    def batches(start):
        from pipeline.data.stream import Position

        stream = MixedStream(sources, (1.0, 3.0), rank=0, world_size=1, batch_size_per_rank=20, decode=decode,
                             seed=3, shuffle_window=4, start=Position(0, start), collate=list)
        it = iter(stream)
        return [next(it) for _ in range(4)]

    run = batches(0)
    names = Counter(name for item in run for name in item.batch)
    assert 0.65 < names["small"] / 80 < 0.85  # weights 1:3 although 'small' holds 1/5 of the samples
    resumed = batches(run[1].position.offset)
    assert [item.batch for item in resumed[:2]] == [item.batch for item in run[2:]]


def _train_steps(model, steps: int = 3) -> None:
    loss_fn = build_contrastive_loss(ContrastiveSection(), rank=0, world_size=1)
    optimizer = torch.optim.AdamW(clip_param_groups(model, 0.1), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=generator)
        texts = torch.randint(1, 49406, (8, 32), generator=generator)
        loss = contrastive_loss(loss_fn, model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lit_locked_image_tower_and_bn_statistics_do_not_change():
    cfg = ContrastiveSection(lock_image=True, lock_image_freeze_bn_stats=True)
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-rn"), cfg)
    visual, text = _snapshot(model.visual), _snapshot(model.transformer)
    _train_steps(model)
    after = _snapshot(model.visual)
    assert all(torch.equal(after[k], v) for k, v in visual.items())  # weights and BN running stats
    assert any(not torch.equal(model.transformer.state_dict()[k], v) for k, v in text.items())


def test_lit_partial_unlock_and_text_lock():
    cfg = ContrastiveSection(lock_image=True, lock_image_unlocked_groups=1, lock_text=True,
                             lock_text_unlocked_layers=1)
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-vit"), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and not any(n.startswith("visual.transformer") for n in trainable)
    # open_clip's text groups: embeddings, each block but the last, [last block, ln_final], projection
    assert {n for n in trainable if not n.startswith("visual")} == {"text_projection", "logit_scale"}
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-vit"),
                       ContrastiveSection(lock_text=True, lock_text_unlocked_layers=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual")}
    assert "transformer.resblocks.1.mlp.c_fc.weight" in trainable and "ln_final.weight" in trainable
    assert not any(n.startswith(("transformer.resblocks.0.", "token_embedding")) for n in trainable)
    with pytest.raises(ValueError, match="lock_image_unlocked_groups"):
        build_clip(ModelSection(kind="clip", name="clip-tiny-rn"), cfg)  # the RN tower locks whole


# open_clip_train/main.py, verbatim: the parameters it trains without weight decay.
OPEN_CLIP_TRAIN_EXCLUDE = """exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n"""


def open_clip_train_groups(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(decayed, exempt) parameter names as open_clip_train/main.py splits them."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {n for n, p in named if not exclude(n, p)}, {n for n, p in named if exclude(n, p)}


def clip_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The groups the trainer builds for a CLIP model: the clip family's weight-decay rule (Task.param_groups)."""
    from pipeline import families
    from pipeline.optim import param_groups

    return param_groups(model, weight_decay, exempt=families.get("clip").no_weight_decay)


def our_groups(model: torch.nn.Module, weight_decay: float = 0.2) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = clip_param_groups(model, weight_decay)
    decay = {names[id(p)] for g in groups if g["weight_decay"] == weight_decay for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return decay, exempt


def test_reference_rule_is_still_open_clip_trains():
    import open_clip_train.main

    assert OPEN_CLIP_TRAIN_EXCLUDE in Path(open_clip_train.main.__file__).read_text()


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32-quickgelu", "ViT-B-16-SigLIP"])
def test_weight_decay_groups_equal_open_clip_train_on_real_architectures(name):
    # Built on the meta device: full-size parameter names and shapes, no memory, about a second.
    model = open_clip.create_model(name, device="meta")
    decay, exempt = our_groups(model)
    assert (decay, exempt) == open_clip_train_groups(model)
    # Embeddings are decayed (open_clip_train exempts only what is 1-D or named bn/ln/bias/logit_scale).
    assert any(n.endswith("token_embedding.weight") for n in decay)
    assert any(n.endswith("positional_embedding") for n in decay)


@pytest.mark.parametrize("name, loss", [("clip-tiny-vit", "siglip"), ("clip-tiny-rn", "clip")])
def test_weight_decay_groups_equal_open_clip_train_on_built_models(name, loss):
    model = build_clip(ModelSection(kind="clip", name=name), ContrastiveSection(loss=loss))
    decay, exempt = our_groups(model)
    assert (decay, exempt) == open_clip_train_groups(model)
    assert {"logit_scale", "ln_final.weight"} <= exempt and "token_embedding.weight" in decay
    assert ("logit_bias" in exempt) == (loss == "siglip")
    # LiT: locked parameters leave the optimizer entirely, in both.
    locked = build_clip(ModelSection(kind="clip", name=name), ContrastiveSection(loss=loss, lock_image=True))
    decay, exempt = our_groups(locked)
    assert not any(n.startswith("visual.") for n in decay | exempt)
    assert (decay, exempt) == open_clip_train_groups(locked)


def test_siglip_starts_at_log10_and_minus10_whatever_the_architecture(tmp_path):
    """SigLIP (Zhai et al. 2023): t' = log 10, b = -10 at init, for every image/text tower."""
    # open_clip's own SigLIP configs set the bias but leave the scale at CLIP's log(1/0.07).
    config = open_clip.get_model_config("ViT-B-16-SigLIP")
    assert config["init_logit_bias"] == -10 and "init_logit_scale" not in config
    # An architecture that brings other defaults of its own.
    tiny = json.loads((CLIP_CONFIG_DIR / "clip-tiny-vit.json").read_text())
    (tmp_path / "clip-tiny-own-init.json").write_text(json.dumps({**tiny, "init_logit_scale": 1.0,
                                                                  "init_logit_bias": -3.0}))
    open_clip.add_model_config(tmp_path / "clip-tiny-own-init.json")
    for name in ("clip-tiny-vit", "clip-tiny-rn", "clip-tiny-own-init"):
        model = build_clip(ModelSection(kind="clip", name=name), ContrastiveSection(loss="siglip"))
        assert model.logit_scale.item() == pytest.approx(math.log(10)), name
        assert model.logit_bias.item() == pytest.approx(-10.0), name
    # The CLIP loss keeps what the architecture says.
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-own-init"), ContrastiveSection(loss="clip"))
    assert model.logit_scale.item() == pytest.approx(1.0)


def test_pretrained_open_clip_file_loads_safely(tmp_path):
    torch.manual_seed(5)
    source = open_clip.create_model("clip-tiny-vit")  # open_clip's own format: a 0-d logit scale
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    model = build_clip(ModelSection(kind="clip", name="clip-tiny-vit", pretrained_path=str(tmp_path / "weights.pt")),
                       ContrastiveSection())
    assert torch.equal(model.visual.proj, source.visual.proj)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == source.logit_scale.item()
    torch.save({"state_dict": source.state_dict(), "code": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="refused"):
        build_clip(ModelSection(kind="clip", name="clip-tiny-vit", pretrained_path=str(tmp_path / "pickled.pt")),
                   ContrastiveSection())
