"""What a run reports: intervals and how dynamic the routing is, the per-image outcomes paired
comparisons are computed from, the figures, and the table ``run.py`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agents.evaluate import EvalResult
from agents.statistics import bootstrap_ci, dynamic_blocks, paired_difference, spearman
from backbones.data import ImageTensors, groups_of


def routing_statistics(
    result: EvalResult, full: EvalResult, seed: int, groups: np.ndarray | None = None
) -> dict[str, Any]:
    """Intervals (over ``groups``, the test images' independent units, where given) and how dynamic
    the routing is, from the per-image results of the policy and of the full backbone on the same
    test images."""
    return {
        "accuracy_ci95": list(bootstrap_ci(result.per_image["correct"], seed, groups=groups)),
        "accuracy_vs_full": paired_difference(result.per_image["correct"], full.per_image["correct"], seed, groups),
        # > 0: images the full backbone finds hard (high cross-entropy) run more blocks
        "difficulty_spearman": spearman(result.blocks_per_image, full.per_image["cross_entropy"]),
        "dynamic_blocks": dynamic_blocks(result.execute_rate),
    }


def write_per_image(
    path: Path,
    result: EvalResult,
    full: EvalResult,
    base: EvalResult | None = None,
    groups: np.ndarray | None = None,
    val: EvalResult | None = None,
    val_groups: np.ndarray | None = None,
) -> None:
    """Per-test-image outcomes of the policy, of the full backbone and (a skip-ready backbone's) of the
    base network it was made from, and each image's independent unit (``group``, where the data has
    one); the policy's per-validation-image correctness and executed blocks (``val_correct``,
    ``val_executed``, ``val_group``) (a plain ``.npz``, read with ``allow_pickle=False``): what paired
    comparisons between runs are computed from, on validation (to choose) and on test (to report)."""
    arrays: dict[str, Any] = dict(result.per_image)
    if base is not None:
        arrays["base_correct"] = base.per_image["correct"]
    if groups is not None:
        arrays["group"] = groups
    if val is not None:
        arrays |= {"val_correct": val.per_image["correct"], "val_executed": val.per_image["executed"]}
        if val_groups is not None:
            arrays["val_group"] = val_groups
    np.savez_compressed(
        path,
        **arrays,
        full_correct=full.per_image["correct"],
        full_cross_entropy=full.per_image["cross_entropy"],
    )


def read_per_image(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The per-image outcomes a run wrote (:func:`write_per_image`)."""
    with np.load(Path(run_dir) / "per_image.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_figures(run_dir: Path, writer: Any, result: EvalResult, test_data: Any) -> None:
    """``heatmap.png`` (execute rate, class x block) and ``gallery.png`` (fewest / most blocks),
    beside ``results.json`` and in TensorBoard."""
    import matplotlib.pyplot as plt  # here: matplotlib costs a command line's start-up half a second

    from experiments.figures import class_block_heatmap, path_gallery

    pi = result.per_image
    figures = {"heatmap": class_block_heatmap(pi["executed"], pi["label"], test_data.num_classes)}
    if isinstance(test_data, ImageTensors):  # an image folder's pictures are not held in memory
        figures["gallery"] = path_gallery(
            test_data.images.cpu().numpy(), result.blocks_per_image, pi["label"], pi["correct"]
        )
    for name, fig in figures.items():
        fig.savefig(run_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        # TensorBoard shows the file as written: a figure drawn once (add_figure draws it again, 0.2 s a run)
        writer.add_image(f"eval/{name}", plt.imread(run_dir / f"{name}.png")[..., :3], 0, dataformats="HWC")


def write_evaluation(
    run_dir: Path,
    writer: Any,
    result: EvalResult,
    val: EvalResult,
    full: EvalResult,
    base: EvalResult | None,
    splits: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Everything a run reports of its evaluation: the scalars (TensorBoard), the per-image outcomes
    and the figures (the run folder); closes ``writer``. Returns the results' entries on how dynamic
    the routing is and on the validation split. Intervals resample each split's independent units
    (:func:`backbones.data.groups_of`)."""
    test_data, groups = splits["test"], groups_of(splits["test"])
    dynamics = routing_statistics(result, full, seed, groups)
    scalars = {
        "val_accuracy": val.accuracy,
        "val_flops_fraction": val.flops_fraction,
        "accuracy": result.accuracy,
        "flops_fraction": result.flops_fraction,
        **{k: v for k, v in dynamics.items() if isinstance(v, float | int)},
    }
    for name, value in scalars.items():
        writer.add_scalar(f"eval/{name}", value, 0)
    write_per_image(run_dir / "per_image.npz", result, full, base, groups, val, groups_of(splits["val"]))
    write_figures(run_dir, writer, result, test_data)
    writer.close()
    return {
        **dynamics,
        "val_accuracy": val.accuracy,
        "val_accuracy_ci95": list(bootstrap_ci(val.per_image["correct"], seed, groups=groups_of(splits["val"]))),
        "val_flops_fraction": val.flops_fraction,
        "val_num_images": val.num_images,
    }


def _stages_line(stages: list[dict[str, Any]]) -> str:
    return " -> ".join(
        f"{s['stage']}: {100 * s['val_accuracy']:.2f}%"
        + (f" at {100 * s['val_flops_fraction']:.1f}%" if "val_flops_fraction" in s else "")
        for s in stages
    )


def _max_drop_line(search: dict[str, Any]) -> str:
    def tried(t: dict[str, Any]) -> str:
        vs = t.get("val_vs_base")  # absent from runs made before the search judged the interval
        low, high = vs["ci95"] if vs else (0.0, 0.0)
        against = f" ({100 * vs['difference']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}])" if vs else ""
        return f"{t['budget']:g} -> {100 * t['val_accuracy']:.2f}% at {100 * t['val_flops_fraction']:.1f}%{against}"

    missed = "" if search["met"] else " (none within --max-drop: the surest)"
    return (
        f"joint budgets tried on validation: {', '.join(tried(t) for t in search['tried'])} "
        f"(base {100 * search['base_val_accuracy']:.2f}%); chose {search['chosen_budget']:g}{missed}"
    )


def format_table(r: dict[str, Any]) -> str:
    rows = [
        ("agent", r["agent"]),
        ("backbone / data", f"{r['backbone']} / {r['dataset']} ({r['num_images']} test images, {r['device']})"),
        (
            "test accuracy",
            f"{100 * r['accuracy']:.2f}% [{100 * r['accuracy_ci95'][0]:.2f}, {100 * r['accuracy_ci95'][1]:.2f}]  "
            f"(full backbone {100 * r['full_backbone_accuracy']:.2f}%; paired difference "
            f"{100 * r['accuracy_vs_full']['difference']:+.2f} "
            f"[{100 * r['accuracy_vs_full']['ci95'][0]:+.2f}, {100 * r['accuracy_vs_full']['ci95'][1]:+.2f}])",
        ),
        *(
            [
                (
                    "vs the base network",
                    f"base {100 * r['base_backbone_accuracy']:.2f}% (the skip-ready backbone's start); paired "
                    f"difference {100 * r['accuracy_vs_base']['difference']:+.2f} "
                    f"[{100 * r['accuracy_vs_base']['ci95'][0]:+.2f}, {100 * r['accuracy_vs_base']['ci95'][1]:+.2f}]",
                )
            ]
            if "accuracy_vs_base" in r
            else []
        ),
        *([("--max-drop search", _max_drop_line(r["max_drop"]))] if "max_drop" in r else []),
        *([("stages (validation)", _stages_line(r["stages"]))] if r.get("stages") else []),
        (
            "validation",
            f"accuracy {100 * r['val_accuracy']:.2f}% at {100 * r['val_flops_fraction']:.1f}% of the FLOPs "
            f"({r['val_num_images']} images: choose between runs by these, report test)",
        ),
        (
            "FLOPs spent",
            f"{100 * r['flops_fraction']:.1f}% of the full network "
            f"(backbone {100 * r['backbone_flops_fraction']:.1f}% + policy {100 * r['policy_flops_fraction']:.2f}%)",
        ),
        (
            "blocks executed",
            f"{r['blocks_executed']:.2f} per image; computation {r['computation_percent']:.1f}% (paper's measure)",
        ),
        ("execute rate per gated block", " ".join(f"{x:.2f}" for x in r["execute_rate"])),
        (
            "dynamic routing",
            f"{r['dynamic_blocks']} of {len(r['execute_rate'])} blocks decided per image (rate in (0.1, 0.9)); "
            f"Spearman(blocks run, full backbone's cross-entropy) = {r['difficulty_spearman']:+.3f}",
        ),
        ("wall-clock", f"{r['wall_seconds']:.1f} s (training {r['train_seconds']:.1f} s)"),
        ("results", f"{r['run_dir']}/results.json"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
