"""A tiny WD14-style tagger built with the onnx package, in the published layout: a folder with
``model.onnx`` (one NHWC float32 image input, one ``[batch, tags]`` sigmoid output) and
``selected_tags.csv`` (``tag_id,name,category,count``).

The model averages the image's three channels (as given: BGR for a correctly prepared image),
scales them to 0-1 and applies one linear layer and a sigmoid. Its weights are chosen so that a
pure red image gets the probabilities ``RED`` and a pure blue one ``BLUE`` (green has no weight),
so tests can say exactly which tags an image should get.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

LABELS = [  # (name, category)
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("solo", 0), ("red_hair", 0), ("blue_sky", 0), ("white_background", 0), ("^_^", 0), ("long_hair", 0),
    ("hatsune_miku", 4), ("kasane_teto_(utau)", 4),
]
NAMES = [name for name, _ in LABELS]

# probabilities of each label for a pure red and a pure blue image
RED = dict(zip(NAMES, [0.80, 0.30, 0.10, 0.05, 0.95, 0.60, 0.90, 0.05, 0.20, 0.50, 0.36, 0.10, 0.88]))
BLUE = dict(zip(NAMES, [0.20, 0.70, 0.10, 0.05, 0.40, 0.90, 0.05, 0.97, 0.20, 0.70, 0.34, 0.50, 0.02]))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def weights() -> np.ndarray:
    """``(3, tags)``: rows B, G, R."""
    w = np.zeros((3, len(LABELS)), dtype=np.float32)
    w[0] = [_logit(BLUE[n]) for n in NAMES]
    w[2] = [_logit(RED[n]) for n in NAMES]
    return w


def expected(mean_bgr_0_1) -> dict[str, float]:
    """The model's probabilities for an image whose prepared pixels average ``mean_bgr_0_1``."""
    logits = np.asarray(mean_bgr_0_1, dtype=np.float64) @ weights().astype(np.float64)
    return dict(zip(NAMES, (1 / (1 + np.exp(-logits))).tolist()))


def save_tagger(folder: Path, size: int = 16, batch: int | str = "N", input_name: str = "input_1:0",
                output_name: str = "predictions_sigmoid", labels=LABELS, n_outputs: int | None = None) -> Path:
    """Write ``model.onnx`` and ``selected_tags.csv`` into ``folder``; returns the folder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w = weights()
    n = n_outputs or len(labels)
    if n != w.shape[1]:
        w = np.resize(w, (3, n))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "w"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], [output_name]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, n])],
        initializer=[numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
                     numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(labels):
            writer.writerow([1000 + i, name, category, 100 - i])
    return folder
