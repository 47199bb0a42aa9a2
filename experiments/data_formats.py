"""Your own data against the built-in loader (``bench.py --parts data``, BENCHMARKS.md section 10):
``cluttered_digits`` written as a user would hand it over (a PNG folder, an ``.npz``), the default
backbone trained from each, test accuracy (paired with the built-in loader's, on the same images)
and seconds per epoch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.data import ImageTensors


def write_user_formats(root: Path) -> dict[str, tuple[str, Path]]:
    """``cluttered_digits`` written as a user would hand it over: ``root/png/{train,val,test}/<label>/
    <index>.png`` and ``root/cluttered.npz``; returns ``{label: (dataset name, data root)}``."""
    from PIL import Image

    from backbones.data import load_dataset
    from backbones.splits import SPLITS

    arrays: dict[str, Any] = {}
    for split in SPLITS:
        data = load_dataset("cluttered_digits", split)
        assert isinstance(data, ImageTensors)
        images, labels = data.images[:, 0].numpy(), data.labels.numpy()  # (N, H, W) uint8
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
        for label in np.unique(labels):
            (root / "png" / split / str(label)).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image, mode="L").save(root / "png" / split / str(label) / f"{i:05d}.png")
    np.savez(root / "cluttered.npz", **arrays)
    return {"PNG folder": ("imagefolder", root / "png"), ".npz": ("npz", root / "cluttered.npz")}


def bench_data(device: torch.device, epochs: int, seed: int = 0) -> dict[str, Any]:
    """The backbone (the default: CIFAR ResNet-38 w0.5, no flips as for digits) trained on
    ``cluttered_digits`` from the built-in loader, a PNG folder and an ``.npz``; test accuracy
    (interval, paired difference to the built-in loader on the same images) and seconds per epoch."""
    import tempfile

    from agents.statistics import bootstrap_ci, paired_difference
    from backbones.data import load_dataset
    from backbones.train import TrainConfig, train

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"built-in": ("cluttered_digits", None), **write_user_formats(Path(tmp))}
        sources_labels = np.load(Path(tmp) / "cluttered.npz")["y_test"]
        for label, (dataset, root) in sources.items():
            t0 = time.perf_counter()
            test = load_dataset(dataset, "test", root)
            assert isinstance(test, ImageTensors)  # small images: in memory, whichever the format
            load_s = time.perf_counter() - t0
            cfg = TrainConfig(
                dataset=dataset, data_root=None if root is None else str(root), flip=False, epochs=epochs, seed=seed,
                device=str(device), out=f"{tmp}/{label}.pt", log_dir=f"{tmp}/runs", progress=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            net, meta = train(cfg)
            seconds = time.perf_counter() - t0
            correct = []
            with torch.no_grad():
                for idx in torch.arange(len(test)).split(1000):
                    x, y = test.to(device).batch(idx.to(device))
                    correct.append((net(x).argmax(1) == y).cpu().numpy())
            c = np.concatenate(correct).astype(np.float64)
            if dataset == "imagefolder":  # the folder lists images by class, then file name: back to index order
                names = sorted((int(lbl), i) for i, lbl in enumerate(sources_labels))
                c = c[np.argsort([i for _, i in names])]
            rows[label] = {"correct": c, "accuracy": float(c.mean()), "ci95": bootstrap_ci(c, seed),
                           "epoch_s": seconds / epochs, "test_load_s": load_s}  # fmt: skip
    base = rows["built-in"]["correct"]
    for r in rows.values():
        r["vs_built_in"] = paired_difference(r["correct"], base, seed)
        r["epoch_over_built_in"] = r["epoch_s"] / rows["built-in"]["epoch_s"]
    for r in rows.values():
        del r["correct"]
    return rows
