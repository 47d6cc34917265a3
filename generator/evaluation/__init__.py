"""Quality metrics for benchmarks: PSNR, SSIM, ROC AUC, Fréchet distance, and the small real-data
classifier whose features define that distance (used by ``scripts/`` and tests, not by the verbs)."""

from generator.evaluation.classifier import Classifier, synthetic_to_real_auc, train_classifier
from generator.evaluation.metrics import frechet_distance, psnr, roc_auc, ssim

__all__ = ["Classifier", "synthetic_to_real_auc", "train_classifier", "frechet_distance", "psnr", "roc_auc", "ssim"]
