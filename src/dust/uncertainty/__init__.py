"""Uncertainty estimates used by DUST: sample-level (across pre-training checkpoints) and pixel-level
(between the two decoders of a dual-decoder U-Net). ``sample`` and ``pixel`` are pure tensor math; ``report``
writes what a user reads (the ranked CSV, figures)."""

from dust.uncertainty.pixel import decoder_kl, predictive_entropy, uncertainty_map, uncertainty_name
from dust.uncertainty.sample import sample_uncertainty, split_by_uncertainty

__all__ = ["decoder_kl", "predictive_entropy", "uncertainty_map", "uncertainty_name", "sample_uncertainty",
           "split_by_uncertainty"]
