"""Evaluation of pre-trained encoders, per stage: k-NN, linear probes, fine-tuning."""
from isolocal.eval.features import StageFeatures, eval_datasets, extract_features, pool_tokens, split_features
from isolocal.eval.finetune import build_classifier, classifier_accuracy, finetune, finetune_optimizer
from isolocal.eval.knn import knn_accuracy, knn_per_stage, knn_predict, online_knn
from isolocal.eval.linear import LinearProbe, linear_per_stage, train_linear_probe

__all__ = [
    "LinearProbe", "StageFeatures", "build_classifier", "classifier_accuracy", "eval_datasets", "extract_features",
    "finetune", "finetune_optimizer", "knn_accuracy", "knn_per_stage", "knn_predict", "linear_per_stage",
    "online_knn", "pool_tokens", "split_features", "train_linear_probe",
]
