"""Evaluate uncertainty heads as the paper does: R-AUROC, Recall@1, baselines, analyses."""
