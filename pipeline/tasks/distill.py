"""Distillation: function matching into a classifier, and CLIP into a smaller CLIP.

Into a classifier, by function matching (Beyer et al. 2022, "a good teacher is patient
and consistent").

Teacher and student see the identical tensor: one augmentation applied once by the data stream, one
mixup on that shared view, then KL(teacher || student) at temperature T, plus an optional loss on the
labels. The teacher is any checkpoint REF the evaluation resolver understands: a classifier (its
logits) or a CLIP model (its zero-shot head over class-name prompts). It is frozen, in eval mode, and
lives outside the DeepSpeed engine, so it is never written into the student's checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms import Normalize

from pipeline import families
from pipeline.config import Config, ConfigError
from pipeline.data.shards import read_manifest
from pipeline.precision import autocast
from pipeline.tasks.classify import ClassifyTask, num_classes_of, train_class_names
from pipeline.tasks.contrastive import ContrastiveTask
from pipeline.tasks.contrastive_loss import clamp_logit_scale


def load_teacher(cfg: Config):
    from pipeline.evaluation.resolver import resolve

    try:
        return resolve(cfg.distill.teacher, cfg.distill.teacher_model)
    except ValueError as err:
        raise ConfigError("distill.teacher", str(err)) from None


def zero_shot_prompts(cfg: Config) -> tuple[list[str], list]:
    """Class names and templates for a CLIP teacher's zero-shot head."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from pipeline.evaluation.datasets import read_classnames, read_templates

    if cfg.distill.zeroshot_classes:
        folder = Path(cfg.distill.zeroshot_classes)
        classnames, templates = read_classnames(folder), read_templates(folder)
        if not classnames:
            raise ConfigError("distill.zeroshot_classes", f"{folder} has no classnames.txt")
        return classnames, templates or list(OPENAI_IMAGENET_TEMPLATES)
    manifest = read_manifest(cfg.data.train)
    if not manifest or not manifest.get("classnames"):
        raise ConfigError("distill.zeroshot_classes", "a CLIP teacher needs class names: set this folder "
                          "or train on shards whose manifest lists classnames")
    return list(manifest["classnames"]), list(OPENAI_IMAGENET_TEMPLATES)


def _teacher_normalize(preprocess) -> Normalize | None:
    for transform in getattr(preprocess, "transforms", []):
        if isinstance(transform, Normalize):
            return transform
    return None


def gives_logits(resolved) -> bool:
    """Whether a teacher's own outputs are class logits: its family scores `launch eval classify`. Otherwise
    (CLIP) its logits come from a zero-shot head over class-name prompts."""
    return "classify" in families.get(resolved.kind).eval_tasks


class TeacherLogits(torch.nn.Module):
    """Frozen teacher: student-normalised images -> class logits."""

    def __init__(self, resolved, cfg: Config, device: torch.device):
        super().__init__()
        self.model = resolved.model.to(device).eval().requires_grad_(False)
        self.kind = resolved.kind
        self.renormalize = self.renormalizer(resolved.preprocess, cfg, device)
        self.head = None
        if not gives_logits(resolved):
            from pipeline.evaluation.zero_shot import LOGIT_SCALE, build_zeroshot_head

            classnames, templates = zero_shot_prompts(cfg)
            self.head = build_zeroshot_head(self.model, resolved.tokenizer, classnames, templates, device) * LOGIT_SCALE

    @staticmethod
    def renormalizer(preprocess, cfg: Config, device: torch.device):
        """Our batches are normalised with data.mean/std; the teacher expects its own statistics."""
        student = torch.tensor(cfg.data.mean), torch.tensor(cfg.data.std)
        norm = _teacher_normalize(preprocess)
        teacher = (torch.tensor(norm.mean), torch.tensor(norm.std)) if norm else student
        scale = (student[1] / teacher[1]).view(1, 3, 1, 1).to(device)
        shift = ((student[0] - teacher[0]) / teacher[1]).view(1, 3, 1, 1).to(device)
        return lambda images: images * scale + shift

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.renormalize(images)
        if self.head is None:
            return self.model(images).float()
        return F.normalize(self.model.encode_image(images).float(), dim=-1) @ self.head


class DistillClassifierTask(ClassifyTask):
    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.teacher = TeacherLogits(load_teacher(cfg), cfg, device)
        self.temperature = cfg.distill.temperature

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        notes = super().check(cfg)
        resolved = load_teacher(cfg)
        if gives_logits(resolved):
            classes = _classifier_outputs(resolved.model)
            if classes != num_classes_of(cfg):
                raise ConfigError("distill.teacher", f"teacher predicts {classes} classes, the student "
                                  f"{num_classes_of(cfg)}")
            _check_teacher_class_names(resolved, cfg)
        else:
            zero_shot_prompts(cfg)
        return notes

    def loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        images, targets = self.mixed_view(batch)  # augmented once by the stream, mixed once: the shared view
        with autocast(self.device, self.amp):
            teacher_logits = self.teacher(images)
        student_logits = engine(images).float()
        loss = self.cfg.distill.distill_weight * kl_teacher_student(teacher_logits, student_logits, self.temperature)
        if self.cfg.distill.hard_label_weight > 0:
            loss = loss + self.cfg.distill.hard_label_weight * self.loss_fn(student_logits, targets)
        return loss, len(images)


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2 so gradients keep their scale across T."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _check_teacher_class_names(resolved, cfg: Config) -> None:
    """The KL term matches teacher and student outputs index by index: both must mean the same classes."""
    from pipeline.class_names import model_class_names

    teacher_names, where = model_class_names(resolved.path, resolved.run_config)
    student_names = train_class_names(cfg)
    if teacher_names and student_names and teacher_names != student_names:
        detail = ("the same classes in another order" if sorted(teacher_names) == sorted(student_names)
                  else f"{len(teacher_names)} classes against {len(student_names)}, not the same names")
        raise ConfigError("distill.teacher", f"the teacher's class list ({where}) differs from the training "
                          f"manifest's ({detail}): distillation matches outputs index by index")


def _classifier_outputs(model: torch.nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or model.get_classifier().out_features)


class DistillContrastiveTask(ContrastiveTask):
    """CLIP -> smaller CLIP: the student matches the teacher's in-batch image-text similarity distribution
    (open_clip's DistillClipLoss: cross-entropy of the student's logits against the teacher's softmax, both
    directions, over the global batch) plus, with weight hard_label_weight, its own contrastive loss.
    The teacher's logit scale sets the sharpness of its targets, so distill.temperature is not used here."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        resolved = load_teacher(cfg)
        self.teacher = resolved.model.to(device).eval().requires_grad_(False)
        self.renormalize = TeacherLogits.renormalizer(resolved.preprocess, cfg, device)
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.distill_loss = open_clip.loss.DistillClipLoss(
            local_loss=cfg.contrastive.local_loss, gather_with_grad=cfg.contrastive.gather_with_grad,
            cache_labels=True, rank=rank, world_size=world_size)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.contrastive.loss != "clip":
            raise ConfigError("contrastive.loss", "CLIP distillation matches softmax similarity distributions: use clip")
        if cfg.contrastive.matryoshka_dims:  # DistillClipLoss scores the full width only
            raise ConfigError("contrastive.matryoshka_dims", "not supported by launch distill: leave it empty")
        resolved = load_teacher(cfg)
        if resolved.kind != cfg.model.kind:  # the teacher's similarities come from its own two towers
            raise ConfigError("distill.teacher", f"a CLIP student needs a CLIP teacher, got a {resolved.kind}")
        probe = "a photo of the handwritten digit seven"
        ours = open_clip.get_tokenizer(cfg.model.name)([probe])
        if not torch.equal(resolved.tokenizer([probe]), ours):
            raise ConfigError("distill.teacher", "teacher and student tokenize text differently; the batch "
                              "carries the student's tokens only")

    def loss(self, engine, batch) -> tuple[torch.Tensor, int]:
        images, texts = batch
        images, texts = self.images_to_device(images), texts.to(self.device, non_blocking=True)
        with torch.no_grad(), autocast(self.device, self.amp):
            teacher = {"image_features": self.teacher.encode_image(self.renormalize(images), normalize=True),
                       "text_features": self.teacher.encode_text(texts, normalize=True),
                       "logit_scale": self.teacher.logit_scale.exp()}
        outputs = engine(images, texts)
        losses = self.distill_loss(
            outputs["image_features"].float(), outputs["text_features"].float(),
            clamp_logit_scale(outputs["logit_scale"].float()),
            teacher["image_features"].float(), teacher["text_features"].float(), teacher["logit_scale"].float(),
            output_dict=True)
        loss = self.cfg.distill.distill_weight * losses["distill_loss"]
        if self.cfg.distill.hard_label_weight > 0:
            loss = loss + self.cfg.distill.hard_label_weight * losses["contrastive_loss"]
        return loss, len(texts)
