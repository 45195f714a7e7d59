"""``build_report``: recompute a checkpoint's validation embeddings, then write figures and one HTML page."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recognite._atomic import atomic_write_text
from recognite.report import plots
from recognite.report._data import (
    RECALL_GRID,
    ReportData,
    compute_report_data,
    confused_pairs,
    open_set_rates,
    per_label_table,
    pooled_operating_point,
    worst_queries,
)
from recognite.report.html import Figure, Page, Table, format_number, render_page
from recognite.utils.device import resolve_device
from recognite.utils.validate import check_int

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
PR_FILE = "pr_curve.png"
CMC_FILE = "cmc.png"
HISTOGRAM_FILE = "score_histograms.png"
TRAINING_FILE = "training_curves.png"
WORST_PREFIX = "worst_queries"
ROWS_PER_GRID = 10
CMC_MAX_RANK = 20
TOP_K = 5
DEVICES = ("auto", "cpu", "cuda")


def _resolve_checkpoint(run_dir: Path, checkpoint: str | os.PathLike) -> Path:
    candidate = Path(checkpoint)
    for path in ((run_dir / candidate,) if not candidate.is_absolute() else ()) + (candidate,):
        if path.is_file():
            return path
    available = sorted(p.name for p in run_dir.glob("*.pt"))
    raise FileNotFoundError(
        f"checkpoint {str(checkpoint)!r} not found in {str(run_dir)!r} (nor as a path); "
        f"checkpoints there: {available or 'none'}."
    )


def _resolve_csv(config: dict[str, Any], run_dir: Path, data_csv: str | os.PathLike | None) -> Path:
    if data_csv is not None:
        path = Path(data_csv)
        if not path.is_file():
            raise FileNotFoundError(f"data_csv {str(path)!r} does not exist.")
        return path
    recorded = Path(str(config.get("data_csv", "")))
    for path in (recorded, run_dir / recorded):
        if str(recorded) and path.is_file():
            return path
    raise FileNotFoundError(
        f"The run's data CSV {str(recorded)!r} (config data_csv) was not found from {os.getcwd()!r} "
        f"nor from the run folder; pass data_csv=... (CLI: --data-csv) to point at it."
    )


def _load_model(state: dict[str, Any], source: str) -> Any:
    """The checkpoint's Recognizer, built by the one factory (:meth:`Recognizer.from_config`)."""
    from recognite.model import Recognizer

    model_config = state.get("model_config") or {"model_name": (state.get("config") or {}).get("model_name")}
    model = Recognizer.from_config(model_config, source=source)
    model.load_weights(state["model"], source=source)
    return model


def _embed(model: Any, dataset: Any, config: dict[str, Any], device: torch.device, desc: str,
           progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from recognite.eval import embed_loader
    from recognite.utils import collate_three_crops, embeddings_three_crops

    three_crop = bool(config.get("three_crop", False))
    loader = DataLoader(dataset, batch_size=int(config.get("val_batch_size", 128)), shuffle=False, num_workers=0,
                        collate_fn=collate_three_crops if three_crop else None)
    batches = tqdm(loader, desc=desc, disable=not progress, leave=False)
    return embed_loader(model, batches, device, embeddings_three_crops if three_crop else None)


class _ThreeCropsOf:
    """Apply ``transform``, then cut three crops unless it already did (``(C, H, W)`` -> ``(3, C, S, S)``)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        from recognite.utils import three_crop

        out = self.transform(image)
        return three_crop(out) if out.dim() == 3 else out


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _remove_stale_figures(output_dir: Path) -> None:
    names = {PR_FILE, CMC_FILE, HISTOGRAM_FILE, TRAINING_FILE}
    for path in output_dir.glob("*.png"):
        if path.name in names or (path.name.startswith(WORST_PREFIX) and path.name.endswith(".png")):
            path.unlink()


def build_report(
    run_dir: str | os.PathLike,
    checkpoint: str | os.PathLike = "best.pt",
    output_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    num_worst: int = 8,
    progress: bool = True,
    *,
    data_csv: str | os.PathLike | None = None,
) -> Path:
    """Write an HTML report with figures for a checkpoint of a training run.

    The validation split of the run (same CSV, folds, seeds and gallery references as in
    training) is embedded again with the checkpoint, and every query is scored against the
    gallery. ``output_dir`` then holds ``report.html`` (self-contained: inline style, figures
    referenced by relative file names, so the folder can be zipped), ``summary.json`` and the PNG
    figures: ``training_curves.png`` (when ``metrics.csv`` exists), ``pr_curve.png``, ``cmc.png``,
    ``score_histograms.png`` and ``worst_queries.png`` (then ``worst_queries_2.png`` ... for more
    than 10 worst queries). See ``docs/report.md`` for how to read them.

    Args:
        run_dir: The run folder written by ``recognite train`` (``best.pt``, ``metrics.csv`` ...).
        checkpoint: Checkpoint file name in ``run_dir`` (or a path).
        output_dir: Where to write the report (default ``run_dir/report``).
        device: ``'auto'``/``None`` (CUDA when available), ``'cpu'``, ``'cuda'`` or a torch device.
        num_worst: Number of worst queries shown with their top-5 gallery items (0: none). Worst =
            lowest average precision, ties broken by the lowest margin between the best positive
            and the hardest negative score.
        progress: Show progress bars while embedding.
        data_csv: The data CSV, when the path recorded in the run's config does not resolve from
            here.

    Returns:
        Path of ``report.html``.

    Raises:
        FileNotFoundError: Missing run folder, checkpoint or data CSV.
        ValueError: Bad ``num_worst`` or ``device``.
        ImportError: matplotlib is not installed (``pip install 'recognite[plot]'``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} is not a folder.")
    check_int(num_worst, "num_worst", minimum=0, message=f"num_worst must be an integer >= 0, got {num_worst!r}.")
    plots.check_matplotlib()
    torch_device = resolve_device(device)
    checkpoint_path = _resolve_checkpoint(run_dir, checkpoint)
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "report"

    from recognite.checkpoint import checkpoint_threshold, load_checkpoint
    from recognite.data import train_val_datasets
    from recognite.data.transforms import eval_transform, three_crop_eval_transform
    from recognite.eval.summary import summary_metrics
    from recognite.utils import avg_ref_embs

    state = load_checkpoint(checkpoint_path)
    config: dict[str, Any] = dict(state.get("config") or {})
    if not config:
        raise ValueError(f"{checkpoint_path} holds no training config; it was not written by recognite train.")
    csv_file = _resolve_csv(config, run_dir, data_csv)
    model = _load_model(state, str(checkpoint_path))
    image_size = int(config.get("image_size", model.preprocessing.crop_size))
    if config.get("three_crop"):
        tfm_val: Any = _ThreeCropsOf(three_crop_eval_transform(model.preprocessing, image_size))
    else:
        tfm_val = eval_transform(model.preprocessing, image_size)
    _, ds_gallery, ds_query = train_val_datasets(
        csv_file, image_key=config.get("image_key", "image"), label_key=config.get("label_key", "label"),
        num_folds=int(config.get("num_folds", 5)), val_fold=int(config.get("val_fold", 0)),
        fold_seed=int(config.get("fold_seed", 0)), num_refs=int(config.get("num_refs", 1)),
        ref_seed=int(config.get("ref_seed", 0)), tfm_val=tfm_val,
    )
    if len(ds_query) == 0:
        raise ValueError(f"The validation split of {run_dir} has no queries (every label has <= num_refs images).")
    gallery_embs, gallery_labels = _embed(model, ds_gallery, config, torch_device, "embed gallery", progress)
    query_embs, query_labels = _embed(model, ds_query, config, torch_device, "embed queries", progress)
    gallery_paths = [str(p) for p in ds_gallery.df[ds_gallery.image_key]]
    if config.get("avg_refs"):
        first_of_label: dict[int, str] = {}
        for path, label in zip(gallery_paths, gallery_labels.tolist()):
            first_of_label.setdefault(label, path)
        gallery_embs, gallery_labels = avg_ref_embs(gallery_embs, gallery_labels)
        gallery_paths = [first_of_label[int(label)] for label in gallery_labels]
    metric = str(config.get("metric", "cosine"))
    data = compute_report_data(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric,
                               top_k=TOP_K, cmc_max_rank=CMC_MAX_RANK)
    # The threshold that belongs to this checkpoint's weights (its own epoch's, not the best one's).
    threshold = checkpoint_threshold(state)
    summary = summary_metrics(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=(1, 5),
                              threshold=threshold, threshold_method=str(config.get("threshold_method", "f1")),
                              target_far=float(config.get("target_far", 0.05)))
    threshold = summary.threshold
    label_names = {index: str(name) for name, index in ds_gallery.label_to_int.items()}
    history = _read_history(run_dir)
    context = _ReportContext(
        run_dir=run_dir, checkpoint_path=checkpoint_path, state=state, config=config, data=data,
        metrics=summary.metrics, threshold=threshold, label_names=label_names, history=history,
        query_paths=[str(p) for p in ds_query.df[ds_query.image_key]], gallery_paths=gallery_paths,
        avg_refs=bool(config.get("avg_refs")), csv_folder=csv_file.resolve().parent,
        num_gallery_images=len(ds_gallery),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_figures(output_dir)
    page = context.write_figures_and_page(output_dir, num_worst)
    atomic_write_text(output_dir / REPORT_FILE, render_page(page))
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(context.summary_json(), indent=2, allow_nan=True) + "\n")
    logger.info("Report written to %s", output_dir / REPORT_FILE)
    return output_dir / REPORT_FILE


class _ReportContext:
    """Everything the figures and the page are made from, and the code that lays them out."""

    def __init__(self, *, run_dir: Path, checkpoint_path: Path, state: dict[str, Any], config: dict[str, Any],
                 data: ReportData, metrics: dict[str, float], threshold: float | None, label_names: dict[int, str],
                 history: list[dict[str, Any]], query_paths: list[str], gallery_paths: list[str], avg_refs: bool,
                 csv_folder: Path, num_gallery_images: int) -> None:
        self.run_dir = run_dir
        self.checkpoint_path = checkpoint_path
        self.state = state
        self.config = config
        self.data = data
        self.metrics = metrics
        self.threshold = threshold
        self.label_names = label_names
        self.history = history
        self.query_paths = query_paths
        self.gallery_paths = gallery_paths
        self.avg_refs = avg_refs
        self.csv_folder = csv_folder
        self.num_gallery_images = num_gallery_images
        self.epoch = state.get("epoch")
        self.open_set = open_set_rates(data, threshold) if threshold is not None else {}

    def name(self, label: int) -> str:
        return self.label_names.get(int(label), str(label))

    def _relative(self, path: str) -> str:
        try:
            return Path(path).resolve().relative_to(self.csv_folder).as_posix()
        except ValueError:
            return Path(path).name

    def logged_row(self) -> dict[str, Any] | None:
        for row in self.history:
            if str(row.get("epoch")) == str(self.epoch):
                return row
        return None

    def summary_json(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "checkpoint": self.checkpoint_path.name,
            "epoch": self.epoch,
            "num_queries": int(self.data.query_labels.numel()),
            "num_gallery": int(self.data.gallery_labels.numel()),
            "num_labels": len(set(self.data.query_labels.tolist()) | set(self.data.gallery_labels.tolist())),
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "pooled_AP": clean(self.data.pooled_ap),
            "threshold": clean(self.threshold),
            "open_set_at_threshold": {k: clean(v) for k, v in self.open_set.items()},
            "cmc": [clean(float(v)) for v in self.data.cmc],
        }

    # --- figures ---------------------------------------------------------------------------------

    def write_figures_and_page(self, output_dir: Path, num_worst: int) -> Page:
        data, sections = self.data, []
        if self.history:
            best = int(self.epoch) if isinstance(self.epoch, int) else None
            plots.plot_training_curves(output_dir / TRAINING_FILE, self.history, best_epoch=best)
            sections.append(Figure(
                TRAINING_FILE, "Training curves", "Left: validation metrics on the held-out labels after each "
                "epoch (epoch 0 is the network before training), from metrics.csv; the dotted line marks the "
                "checkpoint of this report. Right: mean training loss per epoch.", "training"))
        operating = pooled_operating_point(data, self.threshold) if self.threshold is not None else None
        plots.plot_pr_curves(output_dir / PR_FILE, data.pooled_recall, data.pooled_precision, data.pooled_ap,
                             RECALL_GRID, data.mean_precision, data.mean_ap, operating, self.threshold,
                             threshold_span=np.concatenate([data.pos_pair_scores, data.neg_pair_scores]),
                             chance_precision=data.num_pos_pairs / max(1, data.num_pos_pairs + data.num_neg_pairs))
        sections.append(Figure(
            PR_FILE, "Precision-recall curves", "Solid: every query-gallery pair pooled into one ranking (one "
            "threshold for all queries, as in open-set deployment). Dashed: the precision-recall curve of each "
            "query (its own ranking of the gallery), interpolated and averaged over queries; its mean AP is "
            "the mAP (with one reference per label each query's curve is a single point, so this curve is flat "
            "at the mAP). The circle is the pooled curve at the calibrated threshold; the dotted line is the "
            "precision of a random ranking.", "pr"))
        plots.plot_cmc(output_dir / CMC_FILE, data.cmc, data.chance_cmc)
        sections.append(Figure(
            CMC_FILE, "CMC curve", f"Fraction of queries whose best correct gallery item is among the first r "
            f"(r = 1..{data.cmc.size}); r = 1 is top-1 accuracy. Tied scores count against the query. Dotted: "
            f"the same for a random order of the gallery.", "cmc"))
        has_pos, has_neg = data.has_pos, torch.isfinite(data.hard_neg)
        plots.plot_score_histograms(
            output_dir / HISTOGRAM_FILE, data.hard_pos[has_pos].numpy(), data.hard_neg[has_neg].numpy(),
            data.pos_pair_scores, data.neg_pair_scores, self.threshold, data.metric,
            data.num_pos_pairs, data.num_neg_pairs)
        sections.append(Figure(
            HISTOGRAM_FILE, "Scores of positives and negatives", "Green: scores of gallery items with the "
            "query's label; red: other labels. Left: per query, its hardest positive (lowest-scoring correct "
            "item) and hardest negative (highest-scoring wrong item); the less they overlap, the better one "
            "threshold separates known from unknown. Right: all pairs (negatives subsampled when there are "
            "many). Each histogram has unit area. Dashed: the calibrated open-set threshold.", "scores"))
        worst = worst_queries(data, num_worst)
        for page_index in range(0, len(worst), ROWS_PER_GRID):
            file_name = WORST_PREFIX + (".png" if page_index == 0 else f"_{page_index // ROWS_PER_GRID + 1}.png")
            chunk = worst[page_index:page_index + ROWS_PER_GRID]
            plots.plot_retrieval_grid(output_dir / file_name, [self._grid_row(q) for q in chunk],
                                      title=f"Worst queries {page_index + 1}-{page_index + len(chunk)} "
                                      f"of {int(has_pos.sum())}: query, then its top-{data.top_indices.shape[1]}")
            sections.append(Figure(
                file_name, "Worst queries" + (f" ({page_index + 1}-{page_index + len(chunk)})" if len(worst) > ROWS_PER_GRID else ""),
                "Each row: a query (first column, with its label and average precision), then the gallery "
                "items it scored highest, best first, with rank, label and score; green frame = same label as "
                "the query (correct), red = another label. When no correct item is in the top "
                f"{data.top_indices.shape[1]}, a last column shows the best correct one and its rank. Worst = "
                "lowest average precision (among equal AP, the lowest margin between the best correct and the "
                "best wrong score), one query per label first so that one bad label does not fill the grid."
                + (" Gallery items are label prototypes (mean of the references); the first reference is shown."
                   if self.avg_refs else ""), "worst" if page_index == 0 else ""))
        if worst:
            sections.append(self._worst_table(worst))
        sections.append(self._confusion_table())
        sections.append(self._label_table())
        return self._page(sections)

    def _grid_row(self, q: int) -> tuple[plots.RetrievedItem, list[plots.RetrievedItem]]:
        data = self.data
        query_label = int(data.query_labels[q])
        query = plots.RetrievedItem(self.query_paths[q], self.name(query_label), note=f"AP {float(data.ap[q]):.3f}")
        items = []
        for index, score in zip(data.top_indices[q].tolist(), data.top_scores[q].tolist()):
            label = int(data.gallery_labels[index])
            items.append(plots.RetrievedItem(self.gallery_paths[index], self.name(label), score,
                                             correct=label == query_label, note="(mean)" if self.avg_refs else ""))
        rank = int(data.first_rank[q])
        if rank > len(items) and int(data.best_pos_index[q]) >= 0:
            index = int(data.best_pos_index[q])
            items.append(plots.RetrievedItem(self.gallery_paths[index], self.name(query_label), float(data.best_pos[q]),
                                             correct=True, note="(mean)" if self.avg_refs else "", rank=rank))
        return query, items

    # --- tables ----------------------------------------------------------------------------------

    def _worst_table(self, worst: list[int]) -> Table:
        data = self.data
        rows = []
        for i, q in enumerate(worst):
            top = data.top_indices[q].tolist()
            rows.append([
                i + 1, self._relative(self.query_paths[q]), self.name(int(data.query_labels[q])), float(data.ap[q]),
                int(data.first_rank[q]), float(data.best_pos[q]), float(data.hard_neg[q]),
                ", ".join(self.name(int(data.gallery_labels[j])) for j in top),
            ])
        return Table("Worst queries (table)", ["#", "query image", "label", "AP", "rank of first correct",
                                               "best correct score", "best wrong score", "top labels"],
                     rows, caption="The queries of the grid above; image paths are relative to the data CSV's folder.")

    def _confusion_table(self) -> Table:
        pairs = confused_pairs(self.data, limit=20)
        rows = [[self.name(p["query_label"]), self.name(p["predicted_label"]), p["count"], p["fraction"],
                 p["mean_score"]] for p in pairs]
        return Table(
            "Most confused label pairs", ["query label", "retrieved instead (top-1)", "queries", "fraction of label's queries",
                                          "mean top-1 score"], rows, sortable=True, anchor="confused",
            caption="Queries whose best gallery item has another label, counted per (query label, wrong label). "
                    "Frequent pairs point at look-alike labels, label noise or duplicates.")

    def _label_table(self) -> Table:
        rows = [[self.name(r["label"]), r["num_queries"], r["num_gallery"], r["mAP"], r["top1"], r["mean_best_pos"],
                 r["mean_hard_neg"]] for r in per_label_table(self.data)]
        rows.sort(key=lambda row: (row[3] if math.isfinite(row[3]) else math.inf, row[0]))
        return Table(
            "Average precision per label", ["label", "queries", "gallery items", "mAP", "top-1", "mean best correct score",
                                            "mean best wrong score"], rows, sortable=True, scroll=True, anchor="labels",
            caption="One row per validation label, hardest first; click a column header to sort.")

    # --- page ------------------------------------------------------------------------------------

    def _page(self, sections: list[Any]) -> Page:
        data, metrics, config = self.data, self.metrics, self.config
        cards = [("top1", "top-1 accuracy", format_number(metrics.get("top1"))),
                 ("top5", "top-5 accuracy", format_number(metrics.get("top5"))),
                 ("mAP", "mAP", format_number(metrics.get("mAP"))),
                 ("MAP@R", "MAP@R", format_number(metrics.get("MAP@R"))),
                 ("threshold", "open-set threshold", format_number(self.threshold))]
        logged = self.logged_row()
        logged_map = plots._number(logged.get("mAP")) if logged else None
        rows: list[tuple[str, Any, str]] = [
            ("top1", metrics.get("top1"), "fraction of queries whose best gallery item has their label (ties count as wrong)"),
            ("top5", metrics.get("top5"), "... among the 5 best gallery items"),
            ("mAP", metrics.get("mAP"), "mean over queries of the average precision of their gallery ranking"),
            ("MAP@R", metrics.get("MAP@R"), "mean average precision at R (R = number of correct gallery items)"),
            ("R-precision", metrics.get("R-precision"), "precision among the first R gallery items"),
            ("pooled AP", data.pooled_ap, "average precision of all query-gallery pairs in one ranking"),
            ("hard_pos_mean", metrics.get("hard_pos_mean"), "mean score of each query's hardest (lowest) positive"),
            ("hard_neg_mean", metrics.get("hard_neg_mean"), "mean score of each query's hardest (highest) negative"),
            ("threshold", self.threshold, "open-set threshold calibrated in training (accept when score >= threshold)"),
            ("DIR", self.open_set.get("DIR"), "detection and identification rate at the threshold: correct and accepted"),
            ("FAR", self.open_set.get("FAR"), "false-accept rate at the threshold, for queries of labels not enrolled"),
            ("queries", int(data.query_labels.numel()), "validation images used as queries"),
            ("gallery items", int(data.gallery_labels.numel()),
             "reference embeddings" + (f" (prototypes of {self.num_gallery_images} images)" if self.avg_refs else "")),
            ("labels", len(set(data.gallery_labels.tolist())), "validation labels, none seen in training"),
        ]
        if logged_map is not None:
            rows.insert(3, ("mAP logged in training", logged_map, f"metrics.csv, epoch {self.epoch} (should equal mAP)"))
        key_settings = [f"{k} {config[k]}" for k in ("model_name", "weights", "image_size", "loss", "epochs", "metric",
                                                       "num_folds", "val_fold", "num_refs") if k in config]
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        subtitle = (f"{self.checkpoint_path.name}" + (f" (epoch {self.epoch})" if self.epoch is not None else "")
                    + f" · validation fold {config.get('val_fold')} of {config.get('num_folds')}: "
                    f"{int(data.query_labels.numel())} queries vs {int(data.gallery_labels.numel())} gallery items "
                    f"of {len(set(data.gallery_labels.tolist()))} labels never seen in training · {data.metric} similarity")
        return Page(
            title=f"recognite report: {self.run_dir.resolve().name}", subtitle=subtitle, cards=cards, summary_rows=rows,
            config=config, key_settings=key_settings, sections=sections,
            footer=f"Generated {when} by recognite report. Figures are the PNG files next to this page.",
        )
