"""Model registry: residual classifiers from timm (CLIP models join in pipeline.models.clip).

Importing this package registers our tiny architectures (resnet_tiny, resnet_nano) with timm, so plain
timm builds them by name: `import pipeline.models, timm; timm.create_model("resnet_tiny", ...)`.
"""
from pipeline.models.residual import RESIDUAL_MODELS, build_classifier

__all__ = ["RESIDUAL_MODELS", "build_classifier", "build_model"]


def build_model(model_cfg, num_classes: int):
    """Build the model a ModelSection names. Only 'classifier' exists in this module family so far."""
    if model_cfg.kind == "classifier":
        return build_classifier(model_cfg, num_classes)
    raise ValueError(f"model.kind: unknown model kind {model_cfg.kind!r} (valid: classifier)")
