"""Counts of a prepared dataset: images per split and positives per label and split."""

from __future__ import annotations

import numpy as np

from transfusion.data.prepared import SPLITS, PreparedDataset


def label_summary(targets: np.ndarray, split: np.ndarray, label_names: list[str]) -> dict:
    """Images per split, positives per split and label, and ignored (NaN) targets if any.

    Args:
        targets: float ``(N, L)``, NaN = ignore.
        split: ``(N,)`` split codes (0 train, 1 val, 2 test).
        label_names: the ``L`` label names.
    """
    summary: dict = {"images": {}, "positives": {}}
    ignored: dict = {}
    for name, code in SPLITS.items():
        rows = targets[split == code]
        summary["images"][name] = int(len(rows))
        summary["positives"][name] = {label: int(np.sum(rows[:, j] > 0.5)) for j, label in enumerate(label_names)}
        nan = {label: int(np.sum(np.isnan(rows[:, j]))) for j, label in enumerate(label_names)}
        if any(nan.values()):
            ignored[name] = nan
    if ignored:
        summary["ignored"] = ignored
    return summary


def describe(prepared: PreparedDataset) -> str:
    """A printable table: images per split, positives (and ignored) per label and split."""
    meta = prepared.meta
    summary = label_summary(prepared.targets, prepared.split, prepared.label_names)
    head = (
        f"{prepared.name} {meta.get('version', prepared.root.name)}: {prepared.resolution} px, "
        f"{prepared.in_channels} channel{'s' if prepared.in_channels != 1 else ''}, "
        f"task {meta.get('task', 'binary')}, augment {meta.get('augment', 'fundus')}"
    )
    width = max([len("images"), *(len(label) for label in prepared.label_names)])
    splits = list(SPLITS)
    lines = [head, f"  {'':<{width}}  " + "  ".join(f"{s:>16}" for s in splits)]
    lines.append(f"  {'images':<{width}}  " + "  ".join(f"{summary['images'][s]:>16}" for s in splits))
    for label in prepared.label_names:
        cells = []
        for s in splits:
            n, pos = summary["images"][s], summary["positives"][s][label]
            cell = f"{pos} ({100.0 * pos / n:.1f}%)" if n else "0"
            ignored = summary.get("ignored", {}).get(s, {}).get(label, 0)
            cells.append(f"{cell} ?{ignored}".rjust(16) if ignored else cell.rjust(16))
        lines.append(f"  {label:<{width}}  " + "  ".join(cells))
    if "ignored" in summary:
        lines.append("  (?n: targets ignored, e.g. uncertain labels under u-ignore)")
    skipped = int(meta.get("skipped", 0))
    if skipped:
        first = meta.get("skipped_files", [{}])[0]
        lines.append(f"  skipped {skipped} bad image files (first: {first.get('path')}: {first.get('reason')})")
    lines.append(f"  at {prepared.root}")
    return "\n".join(lines)
