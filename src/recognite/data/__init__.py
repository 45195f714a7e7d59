"""Datasets and label-disjoint splits for open-set recognition.

A CSV with one ``image,label`` row per image becomes a training set and a
gallery/query pair of validation sets whose labels never occur in training.
"""

from ._csv import load_csv
from .dataset import DataFrameDataset
from .demo import default_demo_root, make_demo_dataset
from .folders import IMAGE_EXTENSIONS, folder_to_csv
from .rotation_classes import RotationClasses
from .samplers import PKBatchSampler
from .splits import k_fold_trainval_split, split_gallery_query
from .train_val import label_mapping, train_val_datasets
from .transforms import (
    ContentCrop,
    RandomAffineOnBorder,
    RandomElasticOnBorder,
    eval_transform,
    three_crop_eval_transform,
    train_transform,
)

__all__ = [
    "ContentCrop",
    "DataFrameDataset",
    "PKBatchSampler",
    "RandomAffineOnBorder",
    "RandomElasticOnBorder",
    "RotationClasses",
    "default_demo_root",
    "eval_transform",
    "make_demo_dataset",
    "three_crop_eval_transform",
    "train_transform",
    "IMAGE_EXTENSIONS",
    "folder_to_csv",
    "k_fold_trainval_split",
    "label_mapping",
    "load_csv",
    "split_gallery_query",
    "train_val_datasets",
]
