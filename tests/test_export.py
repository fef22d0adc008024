"""Export round trips: the files load in open_clip / timm without edits and give our outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open

from pipeline.config import Config
from pipeline.evaluation.export import export
from pipeline.evaluation.resolver import resolve, state_dict_sha256
from test_evaluation_helpers import TINY_CLIP_CONFIG, register_tiny_clip, tiny_clip, write_our_checkpoint


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    name = register_tiny_clip(folder / "configs")
    torch.save(tiny_clip(seed=9).state_dict(), folder / "tiny.pt")
    return name, folder / "tiny.pt"


# A fresh interpreter knows nothing of our registrations: it sees only the exported files.
_OPEN_CLIP_LOADER = """
import sys, open_clip, torch
config, name, weights, out = sys.argv[1:]
open_clip.add_model_config(config)
model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
torch.manual_seed(0)
with torch.no_grad():
    torch.save({"image": model.eval().encode_image(torch.randn(2, 3, 32, 32)),
                "text": model.encode_text(open_clip.get_tokenizer(name)(["a dog", "a cat"]))}, out)
"""


@pytest.mark.integration  # a fresh interpreter imports open_clip (seconds each)
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_export_loads_in_a_fresh_open_clip(tmp_path, clip_file, suffix):
    name, weights = clip_file
    resolved = resolve(str(weights), name)
    written = export(resolved, "open_clip", tmp_path / "out" / f"open_clip_model{suffix}")
    config = tmp_path / "out" / f"{name}.json"
    assert written == [tmp_path / "out" / f"open_clip_model{suffix}", config]
    assert json.loads(config.read_text()) == TINY_CLIP_CONFIG

    subprocess.run([sys.executable, "-c", _OPEN_CLIP_LOADER, str(config), name, str(written[0]),
                    str(tmp_path / "outputs.pt")], check=True, capture_output=True)
    theirs = torch.load(tmp_path / "outputs.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.allclose(resolved.model.encode_image(torch.randn(2, 3, 32, 32)), theirs["image"], atol=1e-6)
        assert torch.allclose(resolved.model.encode_text(resolved.tokenizer(["a dog", "a cat"])), theirs["text"],
                              atol=1e-6)


def test_safetensors_export_resolves_without_model_name(tmp_path, clip_file):
    name, weights = clip_file
    resolved = resolve(str(weights), name)
    (path,) = export(resolved, "safetensors", tmp_path / "tiny.safetensors")
    again = resolve(str(path))
    assert (again.source, again.model_name, again.kind) == ("export", name, "clip")
    assert again.content_sha256 == resolved.content_sha256
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["resclip.content_sha256"] == resolved.content_sha256


def _our_run(tmp_path, model_name: str, step: int = 40):
    raw = Config.from_dict({"data": {"train": "unused", "num_classes": 5, "image_size_px": 32},
                            "model": {"name": model_name}}).to_dict()
    from pipeline import families

    torch.manual_seed(step)
    model = families.get("classifier").build(Config.from_dict(raw), 5)
    write_our_checkpoint(tmp_path / "run", step, model.state_dict(), raw)
    return tmp_path / "run", model.eval()


def test_timm_export_of_our_checkpoint_loads_in_timm(tmp_path):
    run_dir, model = _our_run(tmp_path, "test_resnet")
    resolved = resolve(str(run_dir))
    (path,) = export(resolved, "timm", tmp_path / "test_resnet.pth")
    loaded = timm.create_model("test_resnet", checkpoint_path=str(path), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_our_own_architecture_exports_to_timm_and_safetensors(tmp_path):
    run_dir, model = _our_run(tmp_path, "resnet_nano", step=70)
    resolved = resolve(str(run_dir))
    # resnet_nano is registered with timm by pipeline.models: timm loads the export by name
    (timm_file,) = export(resolved, "timm", tmp_path / "nano.pth")
    import timm

    loaded = timm.create_model("resnet_nano", num_classes=resolved.model.num_classes,
                               checkpoint_path=str(timm_file)).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(images), resolved.model(images), atol=1e-6)
    with pytest.raises(ValueError, match="is a timm architecture"):
        export(resolved, "open_clip", tmp_path / "nano.bin")
    (path,) = export(resolved, "safetensors", tmp_path / "nano.safetensors")
    again = resolve(str(path))
    assert (again.step, again.model_name, again.source) == (70, "resnet_nano", "export")
    assert again.content_sha256 == resolved.content_sha256 == state_dict_sha256(model.state_dict())

