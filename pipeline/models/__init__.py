"""Architectures: residual classifiers from timm (pipeline.models.residual) and CLIP / SigLIP models from
open_clip (pipeline.models.clip). Which one a config builds is its family's business (pipeline.families).

Importing this package registers our tiny architectures (resnet_tiny, resnet_nano) with timm, so plain
timm builds them by name: `import pipeline.models, timm; timm.create_model("resnet_tiny", ...)`.
"""
from pipeline.models.residual import RESIDUAL_MODELS, build_classifier

__all__ = ["RESIDUAL_MODELS", "build_classifier"]
