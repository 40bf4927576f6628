"""Histo-DD dataset distillation: ``distill(real, config, work_dir) -> PatchSet`` (kind synthetic)."""

from histodd_fed.content_hash import data_hash
from histodd_fed.distill.config import DistillConfig
from histodd_fed.distill.engine import DistillResult, distill, run_distillation
from histodd_fed.distill.matching import class_matching_loss, gradient_distance, layer_distance
from histodd_fed.distill.model_aug import augment_model, matched_weights
from histodd_fed.preprocess import resize_images

__all__ = ["DistillConfig", "DistillResult", "augment_model", "class_matching_loss", "data_hash", "distill", "gradient_distance",
           "layer_distance", "matched_weights", "resize_images", "run_distillation"]
