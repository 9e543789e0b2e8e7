"""A PNG chart of a re-basin's alignment report, when matplotlib is installed (an optional dependency).

Left: the matching objective Σ⟨A, P(B)⟩ after each sweep (for MergeMany: after each matching).  Right: per
block, the cosine between A and B before matching and between A and P(B) after it — the alignment gain.
"""
from __future__ import annotations

import atexit
import importlib.util
import io
import os
import shutil
import tempfile
from typing import Iterable, Mapping

from .outputs import check_output_path, write_file

SUFFIXES = (".png",)


_private_folder: list[str] = []


def private_chart_path(name: str) -> str:
    """A path for a chart that is only shown (the tab, the REST status): in a folder of this process's own,
    made with mkdtemp (not a fixed name in the shared temporary folder) and removed at exit."""
    if not _private_folder:
        folder = tempfile.mkdtemp(prefix="lib_rebasin-charts-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _private_folder.append(folder)
    return os.path.join(_private_folder[0], os.path.basename(name))


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _objectives(matching: Mapping) -> tuple[list[float], str]:
    if "rounds" in matching:  # MergeMany: one matching per model and round
        values = [r["objective_after"] for r in matching["rounds"]]
        return values, "matching (model, round)"
    values = [matching.get("objective_before")] + [s["objective"] for s in matching.get("sweeps", [])]
    return [v for v in values if v is not None], "sweep (0 = before matching)"


def write_chart(report: Mapping, path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                overwrite: bool = False) -> str | None:
    """Draw the chart of `report` (a re-basin result's report, or its "matching" part) into `path`, a .png
    file written through the output guard (never an input, never an existing file unless `overwrite`).

    Returns the path, or None when matplotlib is missing or the report has nothing to draw."""
    inputs = list(inputs)
    check_output_path(path, inputs, overwrite, suffixes=SUFFIXES)
    if not available():
        return None
    matching = report.get("matching", report)
    objectives, x_label = _objectives(matching)
    blocks = matching.get("blocks") or {}
    if not objectives and not blocks:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1, 2.2))
    left.plot(range(len(objectives)), objectives, marker="o", color="#3b6ea5")
    left.set_title("objective Σ⟨A, P(B)⟩")
    left.set_xlabel(x_label)
    left.grid(alpha=0.3)
    if blocks:
        names = list(blocks)
        before = [blocks[n]["before"] for n in names]
        after = [blocks[n]["after"] for n in names]
        positions = range(len(names))
        right.bar([p - 0.2 for p in positions], before, width=0.4, label="A vs B", color="#b0b0b0")
        right.bar([p + 0.2 for p in positions], after, width=0.4, label="A vs P(B)", color="#3b6ea5")
        right.set_xticks(list(positions), names, rotation=90, fontsize=7)
        right.set_ylabel("cosine similarity")
        right.set_title("alignment per block")
        right.set_ylim(min(0.0, *before, *after), 1.15)
        right.legend(loc="upper right", ncol=2)
        right.grid(axis="y", alpha=0.3)
    else:
        right.set_axis_off()
    changed = matching.get("changed_groups")
    if changed:
        figure.suptitle(f"groups changed: {changed if isinstance(changed, str) else ', '.join(changed)}")
    image = io.BytesIO()
    figure.savefig(image, format="png")
    return str(write_file(path, image.getvalue(), inputs=inputs, overwrite=overwrite, suffixes=SUFFIXES))
