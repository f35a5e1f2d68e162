"""All analyses of a finished grid, written as files: tables, figures and a report.

:func:`analyze_records` computes every table and figure from job records into one
directory; :func:`write_report` turns that directory into ``report.md`` and a
self-contained ``report.html`` (figures embedded), so a report can be mailed or
opened from an MLflow artifact without anything else.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transfusion.analysis.basin import (
    BASIN_TITLE,
    CURVES_FILE,
    InterpolationInputs,
    basin_markdown,
    basin_rows,
    interpolate_pairs,
    plot_basin,
    read_curves,
    write_curves,
)
from transfusion.analysis.convergence import (
    ConvergenceSettings,
    convergence_markdown,
    convergence_table,
    plot_convergence,
)
from transfusion.analysis.feature_reuse import (
    FEATURE_REUSE_TITLE,
    feature_reuse_markdown,
    feature_reuse_table,
    plot_feature_reuse,
    records_by_block_cell,
)
from transfusion.analysis.filters import plot_filters
from transfusion.analysis.records import JobRecord
from transfusion.analysis.representations import (
    AnalysisExecutor,
    seed_similarity,
    seed_similarity_markdown,
    seed_similarity_requests,
)
from transfusion.analysis.similarity_figures import (
    AnalysisSettings,
    RepresentationCache,
    figure2_data,
    figure2_markdown,
    figure2_requests,
    figure4_data,
    figure4_markdown,
    figure4_requests,
    plot_figure2,
    plot_figure4,
)
from transfusion.analysis.source_distance import (
    SOURCE_DISTANCE_TITLE,
    plot_source_distance,
    source_distance_markdown,
    source_distance_rows,
    source_similarity_requests,
)
from transfusion.analysis.summary import plot_transfer_forest, summary_markdown
from transfusion.analysis.tables import (
    CHEXPERT_PATHOLOGIES,
    is_chexpert,
    paper_delta_auc,
    paper_tables_markdown,
    pathology_markdown,
    pathology_table,
    plot_results,
    results_table,
    write_csv,
)
from transfusion.analysis.transfer_effect import (
    TransferEffectRow,
    transfer_effect_markdown,
    transfer_effect_table,
    which_source_markdown,
)

TRANSFER_EFFECT_TITLE = "Does transfer help?"
WHICH_SOURCE_TITLE = "Which source?"
SUMMARY_TITLE = "Summary"
APPENDIX_TITLE = "Appendix: the grid's resolved config"


@dataclass
class AnalysisOutputs:
    """Files an analysis wrote (paths relative to its directory) and its sections."""

    directory: Path
    sections: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (title, markdown, figure files)
    decompositions: int = 0
    transfer_rows: list[TransferEffectRow] = field(default_factory=list)
    interpolations: int = 0  # pairs interpolated by this analysis (stored curves are reused)


def analyze_records(
    records: list[JobRecord],
    out: Path,
    *,
    grid_name: str,
    dataset: str,
    settings: AnalysisSettings | None = None,
    convergence: ConvergenceSettings | None = None,
    parallel_executor: Callable[[], AnalysisExecutor] | None = None,
    ran: str | None = None,
    interpolation: InterpolationInputs | None = None,
) -> AnalysisOutputs:
    """Every table and figure of the paper's analyses that the records allow, opened by a summary.

    ``parallel_executor`` fans large similarity and interpolation work out (the tasks layer passes
    Ray's); without it, serial. ``ran`` is the summary's sentence on what was run (default: grid,
    dataset and run count). ``interpolation``: what the *Same basin?* section reads besides the
    records (job specs, final weights, the data); without it there is no such section. Curves an
    earlier analysis left in ``out`` (:data:`~transfusion.analysis.basin.CURVES_FILE`) are reused.
    """
    settings = settings or AnalysisSettings()
    convergence = convergence or ConvergenceSettings()
    out.mkdir(parents=True, exist_ok=True)
    result = AnalysisOutputs(out)
    known_curves = read_curves(out / CURVES_FILE)
    optional_figures = ("feature_reuse.png", "transfer_forest.png", "basin_interpolation.png", "source_distance.png")
    for left in (*optional_figures, CURVES_FILE):  # left by an earlier analysis of this grid
        (out / left).unlink(missing_ok=True)
    reuse_rows = feature_reuse_table(records)
    # Every other analysis groups by (model, init, size): a block-shuffled run is a cell of its own there.
    records = records_by_block_cell(records)
    (out / "analysis_settings.json").write_text(
        json.dumps({"similarity": asdict(settings), "convergence": asdict(convergence)}, indent=2)
    )

    rows = results_table(records)
    write_csv(rows, out / "results.csv")
    plot_results(rows, out / "results.png", title=f"{grid_name}: test AUC (mean ± std over seeds)")
    result.sections.append(("Tables 1–3: test AUC and AUPRC, mean ± std over seeds, with cost",
                            paper_tables_markdown(rows, dataset=dataset), ["results.png"]))  # fmt: skip
    (out / "tables.md").write_text(result.sections[-1][1])

    for optional in (
        "transfer_effect.md",
        "which_source.md",
        "table2_pathologies.md",
    ):  # left by an earlier analysis of this grid
        (out / optional).unlink(missing_ok=True)
    result.transfer_rows = transfer_effect_table(records)
    if result.transfer_rows:
        text = transfer_effect_markdown(result.transfer_rows, paper_delta=paper_delta_auc(dataset))
        (out / "transfer_effect.md").write_text(f"### {TRANSFER_EFFECT_TITLE}\n\n{text}")
        forest = plot_transfer_forest(result.transfer_rows, out / "transfer_forest.png")
        result.sections.insert(0, (TRANSFER_EFFECT_TITLE, text, [forest.name] if forest else []))
        which = which_source_markdown(result.transfer_rows)
        if which:
            (out / "which_source.md").write_text(f"### {WHICH_SOURCE_TITLE}\n\n{which}")
            result.sections.insert(1, (WHICH_SOURCE_TITLE, which, []))

    if is_chexpert(dataset) or any(f"test/auc/{p}" in r.metrics for r in records for p in CHEXPERT_PATHOLOGIES):
        text = pathology_markdown(pathology_table(records), with_paper=is_chexpert(dataset))
        (out / "table2_pathologies.md").write_text(text)
        result.sections.append(("Table 2: CheXpert per-pathology test AUC and AUPRC", text, []))

    cache = RepresentationCache(settings, parallel=parallel_executor)
    # One fan-out for every similarity of the report: each (run, layer, step) is decomposed once.
    planners = (figure2_requests, figure4_requests, source_similarity_requests, seed_similarity_requests)
    cache.score_pairs([request for plan in planners for request in plan(records, cache)])
    fig2 = figure2_data(records, cache)
    if fig2:
        plot_figure2(fig2, out / "figure2_similarity.png")
        result.sections.append(("Figure 2: top-layer similarity, Rand–Rand vs Rand–Pretrained",
                                figure2_markdown(fig2), ["figure2_similarity.png"]))  # fmt: skip
    fig4 = figure4_data(records, cache)
    if fig4:
        plot_figure4(fig4, out / "figure4_layer_movement.png")
        result.sections.append(("Figure 4: per-layer similarity at init vs after training",
                                figure4_markdown(fig4), ["figure4_layer_movement.png"]))  # fmt: skip
    distance_rows = source_distance_rows(records, cache)
    if distance_rows:
        plot_source_distance(distance_rows, out / "source_distance.png")
        result.sections.append((SOURCE_DISTANCE_TITLE, source_distance_markdown(distance_rows),
                                ["source_distance.png"]))  # fmt: skip

    conv_rows = convergence_table(records, convergence)
    result.sections.insert(0, (SUMMARY_TITLE, summary_markdown(
        ran or f"grid {grid_name} on {dataset}, {len(records)} finished runs.",
        transfer_rows=result.transfer_rows, convergence_rows=conv_rows,
        convergence_threshold=convergence.describe(), similarity_rows=fig2,
    ), []))  # fmt: skip
    (out / "summary.md").write_text(f"### {SUMMARY_TITLE}\n\n{result.sections[0][1]}")
    if conv_rows:
        plot_convergence(records, out / "figure5_convergence.png", rows=conv_rows)
        text = f"Threshold: {convergence.describe()}.\n\n" + convergence_markdown(conv_rows)
        result.sections.append((f"Figure 5: convergence (threshold {convergence.threshold:.3f}, {convergence.mode})",
                                text, ["figure5_convergence.png"]))  # fmt: skip

    seeds = seed_similarity(records, cache=cache)
    if seeds:
        result.sections.append(("Top-layer SVCCA between seeds", seed_similarity_markdown(seeds), []))
    basin = interpolate_pairs(records, interpolation, settings, known=known_curves, parallel=parallel_executor) \
        if interpolation is not None else None  # fmt: skip
    # The probes' row-sampling rule and who computed the similarities and interpolations, beside the settings.
    (out / "analysis_settings.json").write_text(json.dumps({
        "similarity": asdict(settings), "convergence": asdict(convergence),
        "probe_sampling": cache.sampling_rules(), "similarity_executors": sorted(cache.executors_used),
        "decompositions": cache.decompositions,
        "interpolations": {"computed": basin.computed, "stored": len(basin.pairs) - basin.computed,
                           "executor": basin.executor} if basin else None,
    }, indent=2))  # fmt: skip

    if reuse_rows:
        plot_feature_reuse(reuse_rows, out / "feature_reuse.png")
        result.sections.append((FEATURE_REUSE_TITLE, feature_reuse_markdown(reuse_rows), ["feature_reuse.png"]))
    if basin is not None and basin.pairs:
        write_curves(out / CURVES_FILE, [c for c in basin.curves if not c.error])
        rows = basin_rows(basin)
        figure = plot_basin(rows, out / "basin_interpolation.png")
        result.sections.append((BASIN_TITLE, basin_markdown(rows, points=settings.interpolation_points),
                                [figure.name] if figure else []))  # fmt: skip
        result.interpolations = basin.computed

    if plot_filters(records, out / "filters_conv1.png") is not None:
        text = "Random vs pretrained conv1 filters, at init and after training.\n"
        result.sections.append(("First-layer filters", text, ["filters_conv1.png"]))
    result.decompositions = cache.decompositions
    return result


def code_version_notes(records: list[JobRecord]) -> list[str]:
    """The report summary's lines on the code its runs came from, with a warning per cell that mixes versions.

    A cell's seeds trained by different code versions may differ by more than seed noise
    (a changed default, a fixed bug); runs that recorded no version count as ``unrecorded``.
    """
    if not records:
        return []
    counts = Counter(r.code_version or "unrecorded" for r in records)
    listed = ", ".join(f"{version} ({n} run{'s' if n != 1 else ''})" for version, n in sorted(counts.items()))
    notes = [f"Code version{'s' if len(counts) > 1 else ''} of these runs: {listed}."]
    by_cell: dict[tuple[str, str, str], set[str]] = {}
    for record in records:
        by_cell.setdefault(record.cell, set()).add(record.code_version or "unrecorded")
    mixed = {cell: versions for cell, versions in by_cell.items() if len(versions) > 1}
    for (model, init, size), versions in sorted(mixed.items()):
        notes.append(
            f"Warning: cell {model} / {init} / {size} mixes code versions {', '.join(sorted(versions))}: "
            "its spread over seeds may include code changes (retrain it with --retrain to make it one version)."
        )
    return notes


def write_report(
    outputs: AnalysisOutputs, *, title: str, notes: list[str] | None = None, config_yaml: str | None = None
) -> tuple[Path, Path]:
    """``report.md`` and a self-contained ``report.html`` in the analysis directory.

    The summary comes first, then the notes (what a reader must know before any table),
    then the sections; ``config_yaml`` (the grid as resolved) closes it as an appendix.
    """
    out = outputs.directory
    sections = list(outputs.sections)
    opening = sections.pop(0) if sections and sections[0][0] == SUMMARY_TITLE else None
    md = [f"# {title}", ""]
    if opening:
        md += [f"## {opening[0]}", "", opening[1], ""]
    for note in notes or []:
        md += [f"> {note}", ""]
    for heading, text, figures in sections:
        md += [f"## {heading}", ""]
        md += [f"![{figure}]({figure})" for figure in figures]
        md += ["", text, ""]
    if config_yaml:
        md += [f"## {APPENDIX_TITLE}", "", "```yaml", config_yaml.rstrip(), "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f3f3f3}img{max-width:100%}blockquote{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if opening:
        parts += [f"<h2>{html.escape(opening[0])}</h2>", markdown_tables_to_html(opening[1])]
    for note in notes or []:
        parts.append(f"<blockquote>{html.escape(note)}</blockquote>")
    for heading, text, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for figure in figures:
            data = base64.b64encode((out / figure).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(figure)}' src='data:image/png;base64,{data}'>")
        parts.append(markdown_tables_to_html(text))
    if config_yaml:
        parts += [f"<h2>{html.escape(APPENDIX_TITLE)}</h2>", f"<pre>{html.escape(config_yaml)}</pre>"]
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path


_BOLD = re.compile(r"[*][*](.+?)[*][*]")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    """Escaped text with our Markdown's inline marks: **bold** and [links](url)."""
    text = _BOLD.sub(r"<strong>\1</strong>", html.escape(text, quote=False))
    return _LINK.sub(r"<a href='\2'>\1</a>", text)


def markdown_tables_to_html(text: str) -> str:
    """Our Markdown is pipe tables and plain lines; render just that."""
    out, table = [], []

    def flush() -> None:
        if not table:
            return
        header, *body = [row for row in table if not set(row.replace("|", "").strip()) <= {"-"}]
        cells = lambda row: [c.strip() for c in row.strip().strip("|").split("|")]  # noqa: E731
        out.append("<table><tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in cells(header)) + "</tr>")
        for row in body:
            out.append("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in cells(row)) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{_inline_html(line.lstrip('#> ').strip())}</p>")
    flush()
    return "\n".join(out)
