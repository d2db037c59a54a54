"""Evaluation of pre-trained encoders, per stage: k-NN, linear probes, fine-tuning, on train / val / test splits."""
from isolocal.eval.features import SplitFeatures, extract_features, pool_tokens, split_features
from isolocal.eval.finetune import FinetuneResult, build_classifier, classifier_accuracy, finetune, finetune_optimizer
from isolocal.eval.knn import knn_accuracy, knn_per_stage, knn_predict, online_knn
from isolocal.eval.linear import FittedProbe, LinearProbe, fit_linear_probe, linear_per_stage, probe_top1
from isolocal.eval.splits import EvalSplits, SplitReadTwice, eval_splits

__all__ = [
    "EvalSplits", "FinetuneResult", "FittedProbe", "LinearProbe", "SplitFeatures", "SplitReadTwice",
    "build_classifier", "classifier_accuracy", "eval_splits", "extract_features", "finetune", "finetune_optimizer",
    "fit_linear_probe", "knn_accuracy", "knn_per_stage", "knn_predict", "linear_per_stage", "online_knn",
    "pool_tokens", "probe_top1", "split_features",
]
