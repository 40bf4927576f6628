"""Stain handling: offline Macenko estimation and differentiable online normalisation / jitter."""

from histodd_fed.stain.macenko import (REFERENCE_MAX_CONC, REFERENCE_STAINS, MacenkoParams, choose_template,
                                       estimate_stains, max_concentrations, stain_matrix)
from histodd_fed.stain.normalize import ImageStains, StainContext, jitter_stain, normalize_stain

__all__ = [
    "ImageStains", "MacenkoParams", "REFERENCE_MAX_CONC", "REFERENCE_STAINS", "StainContext", "choose_template",
    "estimate_stains", "jitter_stain", "max_concentrations", "normalize_stain", "stain_matrix",
]
