"""Checkpoint references: every kind of REF resolves to the same weights, and unsafe or ambiguous ones
fail with a one-line ValueError."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import Config
from pipeline.evaluation.resolver import library_for, resolve, state_dict_sha256
from test_evaluation_helpers import TINY_CLIP_CONFIG, register_tiny_clip, tiny_clip, write_our_checkpoint


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory):
    return register_tiny_clip(tmp_path_factory.mktemp("configs"))


def test_open_clip_training_checkpoint_and_safetensors(tmp_path, clip_name):
    model = tiny_clip(seed=4)
    expected = state_dict_sha256(model.state_dict())
    # open_clip's own training script saves {"epoch", "name", "state_dict": {"module.*": ...}, "optimizer"}.
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    save_file(model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    for path in (tmp_path / "epoch_3.pt", tmp_path / "open_clip_model.safetensors"):
        resolved = resolve(str(path), clip_name)
        assert resolved.kind == "clip" and resolved.library == "open_clip" and resolved.source == "weights_file"
        assert resolved.content_sha256 == expected
        assert not resolved.model.training and resolved.tokenizer is not None
        assert resolved.tokenizer(["a cat"]).shape == (1, 77)



def test_state_dict_sha256_is_sha256_over_name_dtype_shape_and_bytes():
    # Written out by hand, so the hashes the tests above compare are themselves checked: tensors in name
    # order, each as "name|dtype|shape" and a newline, then its little-endian bytes.
    import hashlib
    import struct

    state = {"w": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([7], dtype=torch.int16)}
    expected = hashlib.sha256(b"b|torch.int16|(1,)\n" + struct.pack("<h", 7)
                              + b"w|torch.float32|(1, 2)\n" + struct.pack("<2f", 1.0, -2.0)).hexdigest()
    assert state_dict_sha256(state) == expected

def test_timm_checkpoint_gets_its_head_size(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=13)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    resolved = resolve(str(tmp_path / "model.pth"), "test_resnet")
    assert resolved.kind == "classifier" and resolved.model.num_classes == 13
    assert resolved.content_sha256 == state_dict_sha256(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(resolved.model(x), model.eval()(x))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(f"touch {marker}")}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        resolve(str(path), "test_resnet")
    assert not marker.exists()


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _classifier_config() -> dict:
    return Config.from_dict({"data": {"train": "unused", "num_classes": 5, "image_size_px": 32},
                             "model": {"name": "resnet_nano"}}).to_dict()


def test_run_dir_resolves_to_latest_complete_checkpoint(tmp_path):
    from pipeline import families

    cfg = Config.from_dict(_classifier_config())
    states = {}
    for step in (100, 200):
        torch.manual_seed(step)
        states[step] = families.get(cfg.model.kind).build(cfg, 5).state_dict()
        write_our_checkpoint(tmp_path / "run", step, states[step], _classifier_config())
    # A newer write that never finished (no meta.json) must be ignored.
    write_our_checkpoint(tmp_path / "run", 300, states[200], _classifier_config(), complete=False)

    resolved = resolve(str(tmp_path / "run"))
    assert (resolved.step, resolved.source, resolved.kind) == (200, "run_dir", "classifier")
    assert resolved.content_sha256 == state_dict_sha256(states[200])
    assert resolved.preprocess.transforms[1].size == (32, 32)  # the run's validation crop, not timm's 224

    older = resolve(str(tmp_path / "run" / "checkpoints" / "step_00000100"))
    assert (older.step, older.source) == (100, "checkpoint")
    assert older.content_sha256 == state_dict_sha256(states[100])


@pytest.mark.parametrize("ref, model, message", [
    ("missing.pt", None, "no such checkpoint"),
    ("weights.pt", None, "needs --model"),
    ("weights.pt", "no-such-architecture", "not an architecture of open_clip"),
    ("weights.txt", "test_resnet", "unknown weights file type"),
    (".", None, "not a run directory"),
])
def test_user_mistakes_are_one_line_value_errors(tmp_path, ref, model, message):
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match=message) as err:
        resolve(str(tmp_path / ref), model)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_name_the_model(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="do not match model test_resnet"):
        resolve(str(tmp_path / "weights.pt"), "test_resnet")


def test_library_lookup(tmp_path, clip_name):
    assert library_for("ViT-B-32") == ("open_clip", "ViT-B-32")
    assert library_for("resnet50") == ("timm", "resnet50")
    assert library_for("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")
    config = tmp_path / "my-arch.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    assert library_for(str(config)) == ("open_clip", "my-arch")


def test_corrupt_weights_file_is_called_corrupt(tmp_path):
    from pipeline.remote_refs import load_weights_file

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt or not a PyTorch weights file"):
        load_weights_file(bad)
