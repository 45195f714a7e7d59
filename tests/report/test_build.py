"""End to end: a report built from a tiny trained run (one run shared by the tests here)."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from torch.utils.data import DataLoader

from recognite.data import train_val_datasets
from recognite.data.transforms import eval_transform
from recognite.eval import accuracy, cmc, embed_loader, pairwise_scores, pr_metrics
from recognite.model import Recognizer
from recognite.report import build_report
from recognite.train.checkpoint import load_checkpoint


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])


@pytest.fixture(scope="module")
def report(trained_run) -> Path:
    # 12 worst queries: two grid files (10 rows per grid)
    return build_report(trained_run, num_worst=12, device="cpu", progress=False)


@pytest.fixture(scope="module")
def independent(trained_run):
    """Scores of the checkpoint recomputed without the report code."""
    state = load_checkpoint(trained_run / "best.pt")
    cfg = state["config"]
    model = Recognizer(cfg["model_name"])
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("classifier.")})
    tfm = eval_transform(model.preprocessing, cfg["image_size"])
    _, ds_gallery, ds_query = train_val_datasets(cfg["data_csv"], num_folds=cfg["num_folds"], val_fold=int(cfg["val_fold"]),
                                                 fold_seed=cfg["fold_seed"], num_refs=cfg["num_refs"],
                                                 ref_seed=cfg["ref_seed"], tfm_val=tfm)
    g_embs, g_labels = embed_loader(model, DataLoader(ds_gallery, batch_size=5), "cpu")
    q_embs, q_labels = embed_loader(model, DataLoader(ds_query, batch_size=7), "cpu")
    scores = pairwise_scores(q_embs, g_embs, "cosine")
    names = {i: n for n, i in ds_gallery.label_to_int.items()}
    return {"scores": scores, "g_labels": g_labels, "q_labels": q_labels, "state": state, "names": names}


def _html(report: Path) -> str:
    return report.read_text(encoding="utf-8")


def _metric_values(html: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf'data-metric="{re.escape(key)}">([-0-9.]+)<', html)]


def test_every_figure_is_a_valid_png_and_the_html_references_exactly_those(report):
    folder = report.parent
    assert report.name == "report.html" and folder.name == "report"
    parser = _Links()
    parser.feed(_html(report))
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert sorted(parser.images) == pngs
    assert set(pngs) == {"training_curves.png", "pr_curve.png", "cmc.png", "score_histograms.png",
                         "worst_queries.png", "worst_queries_2.png"}
    for name in pngs:
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(folder / name) as image:
            width, height = image.size
            assert 300 <= width <= 3000 and 200 <= height <= 3000, (name, image.size)
            # not a blank canvas
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5, name


def test_html_links_are_relative_and_local(report):
    parser = _Links()
    parser.feed(_html(report))
    assert parser.links
    for link in parser.links:
        assert not link.startswith(("/", "\\", "file:", "http:", "https:")), link
        assert not re.match(r"^[A-Za-z]:", link), link
        assert link.startswith("#") or (report.parent / link).is_file(), link


def test_summary_numbers_equal_independent_computations(report, independent, trained_run):
    html = _html(report)
    scores, g_labels, q_labels = independent["scores"], independent["g_labels"], independent["q_labels"]
    expected_map = pr_metrics(scores.double(), g_labels, q_labels)["mAP"].item()
    expected_top1 = accuracy(scores, g_labels, q_labels)
    assert 0.0 < expected_map < 1.0  # the fixture data is hard enough for errors to show
    for key, expected in (("mAP", expected_map), ("top1", expected_top1)):
        shown = _metric_values(html, key)
        assert len(shown) == 2, key  # the card and the summary table
        assert all(abs(v - expected) <= 5.1e-5 for v in shown), (key, shown, expected)
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["metrics"]["mAP"] == pytest.approx(expected_map, abs=1e-6)
    # The mAP logged during training for that epoch (computed by the trainer's own code path).
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    logged = next(float(r["mAP"]) for r in rows if int(r["epoch"]) == independent["state"]["epoch"])
    assert summary["metrics"]["mAP"] == pytest.approx(logged, abs=1e-5)
    assert summary["threshold"] == pytest.approx(independent["state"]["threshold"])
    # pooled AP against scikit-learn on the flattened score matrix
    same = (q_labels[:, None] == g_labels[None, :]).numpy().ravel()
    assert summary["pooled_AP"] == pytest.approx(average_precision_score(same, scores.numpy().ravel()), abs=1e-9)
    assert summary["cmc"] == pytest.approx(cmc(scores, g_labels, q_labels, max_rank=20).tolist())
    assert summary["num_queries"] == q_labels.numel() and summary["num_gallery"] == g_labels.numel()


def _table_after(html: str, heading: str) -> list[list[str]]:
    section = html.split(f">{heading}</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, flags=re.S)
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in rows]


def test_worst_queries_are_those_of_lowest_ap_one_per_label_first(report, independent):
    scores, g_labels, q_labels = independent["scores"], independent["g_labels"], independent["q_labels"]
    ap = pr_metrics(scores.double(), g_labels, q_labels)["AP"].tolist()
    same = q_labels[:, None] == g_labels[None, :]
    margin = (scores.masked_fill(~same, -np.inf).max(1).values - scores.masked_fill(same, -np.inf).max(1).values).tolist()
    order = sorted(range(len(ap)), key=lambda q: (ap[q], margin[q], q))
    first_per_label, seen = [], set()
    for q in order:
        if q_labels[q].item() not in seen:
            seen.add(q_labels[q].item())
            first_per_label.append(q)
    fill = [q for q in order if q not in first_per_label][: 12 - len(first_per_label)]
    expected = sorted(first_per_label + fill, key=order.index)
    rows = _table_after(_html(report), "Worst queries (table)")[1:]
    assert len(rows) == 12 and len(first_per_label) == 8
    names = independent["names"]
    assert [r[2] for r in rows] == [names[q_labels[q].item()] for q in expected]
    assert np.allclose([float(r[3]) for r in rows], [ap[q] for q in expected], atol=5.1e-5)
    assert [int(r[4]) for r in rows] == [1 + int(((scores[q] >= scores[q][same[q]].max()) & ~same[q]).sum()) for q in expected]


def test_per_label_ap_table_matches_per_query_ap(report, independent):
    ap = pr_metrics(independent["scores"].double(), independent["g_labels"], independent["q_labels"])["AP"]
    rows = _table_after(_html(report), "Average precision per label")[1:]
    names = independent["names"]
    assert len(rows) == len(set(independent["q_labels"].tolist()))
    for label in set(independent["q_labels"].tolist()):
        row = next(r for r in rows if r[0] == names[label])
        mask = independent["q_labels"] == label
        assert int(row[1]) == int(mask.sum())
        assert float(row[3]) == pytest.approx(float(ap[mask].mean()), abs=5.1e-5)


def test_confused_pairs_count_wrong_top1_labels(report, independent):
    scores, g_labels, q_labels = independent["scores"], independent["g_labels"], independent["q_labels"]
    predicted = g_labels[torch.argmax(scores, dim=1)]
    names = independent["names"]
    expected: dict[tuple[str, str], int] = {}
    for p, t in zip(predicted.tolist(), q_labels.tolist()):
        if p != t:
            expected[(names[t], names[p])] = expected.get((names[t], names[p]), 0) + 1
    assert expected  # the fixture data is confusable
    rows = _table_after(_html(report), "Most confused label pairs")[1:]
    shown = {(r[0], r[1]): int(r[2]) for r in rows}
    assert shown == dict(sorted(expected.items(), key=lambda kv: -kv[1])[:20])


def test_bad_arguments_give_clear_errors(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints there: \\['best.pt', 'last.pt'\\]"):
        build_report(trained_run, checkpoint="nope.pt", progress=False)
    with pytest.raises(ValueError, match="num_worst must be an integer >= 0, got -1"):
        build_report(trained_run, num_worst=-1, progress=False)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_report(tmp_path / "missing", progress=False)
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        build_report(trained_run, device="tpu", progress=False)
    with pytest.raises(FileNotFoundError, match="data_csv"):
        build_report(trained_run, data_csv=tmp_path / "none.csv", progress=False)


def test_missing_matplotlib_names_the_extra(trained_run, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'recognite\[plot\]'"):
        build_report(trained_run, output_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_cli_report_replaces_stale_figures(trained_run, tmp_path, capsys):
    from recognite.cli.main import main

    out = tmp_path / "cli_report"
    out.mkdir()
    (out / "worst_queries_3.png").write_bytes(b"old")
    (out / "notes.png").write_bytes(b"kept")  # not a report figure: left alone
    code = main(["report", str(trained_run), "--output-dir", str(out), "--num-worst", "0", "--device", "cpu",
                 "--no-progress"])
    assert code == 0
    assert (out / "report.html").is_file() and (out / "pr_curve.png").is_file()
    assert not any(p.name.startswith("worst_queries") for p in out.iterdir())
    assert (out / "notes.png").read_bytes() == b"kept"
    assert "worst_queries" not in (out / "report.html").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "--num-worst" in capsys.readouterr().out


def test_averaged_references_and_three_crops(trained_run, tmp_path):
    """A run validated with --avg-refs --three-crop --num-refs 2: the gallery holds one prototype per label."""
    from torchvision import transforms as T

    from recognite.data.transforms import three_crop_eval_transform
    from recognite.utils import (
        ThreeCrop,
        avg_ref_embs,
        collate_three_crops,
        embeddings_three_crops,
    )

    state = load_checkpoint(trained_run / "best.pt")
    state["config"].update(avg_refs=True, three_crop=True, num_refs=2)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "best.pt")
    path = build_report(run, num_worst=2, device="cpu", progress=False)
    summary = json.loads((path.parent / "summary.json").read_text())
    assert not (path.parent / "training_curves.png").exists()  # no metrics.csv in this folder

    cfg = state["config"]
    model = Recognizer(cfg["model_name"])
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("classifier.")})
    _, ds_gallery, ds_query = train_val_datasets(cfg["data_csv"], num_folds=cfg["num_folds"], val_fold=int(cfg["val_fold"]),
                                                 num_refs=2, tfm_val=T.Compose([three_crop_eval_transform(model.preprocessing, 32),
                                                                               lambda x: ThreeCrop()(x) if x.dim() == 3 else x]))

    def embed(ds):
        return embed_loader(model, DataLoader(ds, batch_size=6, collate_fn=collate_three_crops), "cpu",
                            embeddings_three_crops)

    g_embs, g_labels = avg_ref_embs(*embed(ds_gallery))
    q_embs, q_labels = embed(ds_query)
    assert summary["num_gallery"] == g_labels.numel() == len(ds_gallery.unique_labels) < len(ds_gallery)
    scores = pairwise_scores(q_embs, g_embs, "cosine")
    assert summary["metrics"]["mAP"] == pytest.approx(pr_metrics(scores.double(), g_labels, q_labels)["mAP"].item(), abs=1e-6)
    assert "(mean)" not in path.read_text()  # the note is in the figure, the caption says prototypes
    assert "prototypes" in path.read_text()
