"""Hub folder exports (`launch export --format open_clip-dir|timm-dir`): each folder loads with the library's
own API alone, open_clip.create_model_and_transforms("local-dir:DIR") and timm.create_model("local-dir:DIR",
pretrained=True), in a fresh interpreter that never imports our package, and gives our outputs and our eval
transform. Our tiny architectures included: clip-tiny-rn is not in open_clip's registry, resnet_nano not in
stock timm."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import families
from pipeline.config import Config
from pipeline.evaluation.export import export
from pipeline.evaluation.resolver import resolve
from test_evaluation_helpers import write_our_checkpoint

pytestmark = pytest.mark.integration  # a fresh interpreter imports open_clip and timm (seconds)

CLASSES = ["ant", "bee", "cat", "dog", "eel"]

# A fresh interpreter: it sees only the exported folders (and fails if anything pulled in our package).
_LOADER = """
import sys, open_clip, timm, torch
from PIL import Image
clip_dir, timm_dirs, image_path, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
image = Image.open(image_path).convert("RGB")
images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
results = {}
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + clip_dir)
tokenizer = open_clip.get_tokenizer("local-dir:" + clip_dir)
with torch.no_grad():
    results["clip"] = {"image": model.eval().encode_image(images), "text": model.encode_text(tokenizer(["a cat"])),
                       "preprocessed": preprocess(image)}
for folder in timm_dirs:
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        results[folder] = {"logits": model(images), "preprocessed": transform(image),
                           "label_names": model.pretrained_cfg.get("label_names")}
assert not any(name.startswith("pipeline") for name in sys.modules), "the loader imported our package"
torch.save(results, out)
"""


def _our_run(folder, model: dict, data: dict, seed: int):
    """One of our checkpoints (ZeRO-0 layout + meta.json) of a randomly initialised model, class names recorded."""
    raw = Config.from_dict({"data": {"train": "unused", **data}, "model": model}).to_dict()
    cfg = Config.from_dict(raw)
    torch.manual_seed(seed)
    built = families.get(cfg.model.kind).build(cfg, cfg.data.num_classes)
    ckpt = write_our_checkpoint(folder, 10, built.state_dict(), raw)
    meta = json.loads((ckpt / "meta.json").read_text())
    if cfg.model.kind == "classifier":
        (ckpt / "meta.json").write_text(json.dumps({**meta, "class_names": CLASSES}))
    return resolve(str(folder))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    clip = _our_run(root / "clip_run", {"kind": "clip", "name": "clip-tiny-rn"}, {"image_size_px": 32}, seed=1)
    # val_image_size_px / crop / interpolation / mean / std away from timm's defaults: the transform must travel.
    data = {"num_classes": len(CLASSES), "image_size_px": 32, "val_image_size_px": 28, "val_crop_pct": 0.8,
            "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    nano = _our_run(root / "nano_run", {"kind": "classifier", "name": "resnet_nano"}, data, seed=2)
    stock = _our_run(root / "stock_run", {"kind": "classifier", "name": "test_resnet"}, data, seed=3)
    files = {"clip": export(clip, "open_clip-dir", root / "clip"), "nano": export(nano, "timm-dir", root / "nano"),
             "stock": export(stock, "timm-dir", root / "stock")}
    image_path = root / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((47, 40), Image.BILINEAR).save(image_path)
    subprocess.run([sys.executable, "-c", _LOADER, str(root / "clip"), f"{root / 'nano'},{root / 'stock'}",
                    str(image_path), str(root / "outputs.pt")], check=True, capture_output=True, cwd=root)
    theirs = torch.load(root / "outputs.pt")
    return {"root": root, "files": files, "ours": {"clip": clip, "nano": nano, "stock": stock},
            "theirs": {"clip": theirs["clip"], "nano": theirs[str(root / "nano")],
                       "stock": theirs[str(root / "stock")]},
            "image": Image.open(image_path).convert("RGB")}


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_open_clip_dir_loads_in_plain_open_clip_with_our_outputs_and_transform(exported):
    root, ours, theirs = exported["root"], exported["ours"]["clip"], exported["theirs"]["clip"]
    assert [p.name for p in exported["files"]["clip"]] == ["open_clip_model.safetensors", "open_clip_config.json"]
    config = json.loads((root / "clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]  # the whole architecture travels
    with torch.no_grad():
        torch.testing.assert_close(theirs["image"], ours.model.encode_image(IMAGES), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs["text"], ours.model.encode_text(ours.tokenizer(["a cat"])), rtol=0,
                                   atol=1e-6)
    torch.testing.assert_close(theirs["preprocessed"], ours.preprocess(exported["image"]), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["nano", "stock"])
def test_timm_dir_loads_in_plain_timm_with_our_logits_labels_and_eval_transform(exported, which):
    ours, theirs = exported["ours"][which], exported["theirs"][which]
    config = json.loads((exported["root"] / which / "config.json").read_text())
    # resnet_nano is not a stock timm name: the folder names resnet18 with the arguments that make it ours.
    assert config["architecture"] == {"nano": "resnet18", "stock": "test_resnet"}[which]
    assert config["pretrained_cfg"]["input_size"] == [3, 28, 28]
    with torch.no_grad():
        torch.testing.assert_close(theirs["logits"], ours.model(IMAGES), rtol=0, atol=1e-6)
    assert theirs["label_names"] == CLASSES
    # resolve_data_config on the loaded model rebuilds the transform our evaluation applies, to the pixel.
    torch.testing.assert_close(theirs["preprocessed"], ours.preprocess(exported["image"]), rtol=0, atol=0)


def test_folder_exports_resolve_back_as_the_same_weights(exported):
    for which, folder in (("clip", "clip"), ("nano", "nano")):
        again = resolve(str(exported["root"] / folder))
        ours = exported["ours"][which]
        assert (again.source, again.model_name, again.step) == ("export", ours.model_name, 10)
        assert again.content_sha256 == ours.content_sha256


def test_folder_export_refusals_are_one_line(exported, tmp_path):
    clip, nano = exported["ours"]["clip"], exported["ours"]["nano"]
    with pytest.raises(ValueError, match=r"^--format timm-dir: clip-tiny-rn is a open_clip architecture; "
                                         r"use --format open_clip-dir$"):
        export(clip, "timm-dir", tmp_path / "x")
    with pytest.raises(ValueError, match="must be a folder"):
        export(nano, "timm-dir", tmp_path / "nano.safetensors")
