"""report.html: the cohort's table with mosaics, fractions and intervals; opens from disk, no network."""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .contract import DEMO_WARNING
from .files import RESEARCH_NOTICE, atomic_path, safe_file_stem
from .geojson import GEOJSON_SUFFIX
from .mosaic import MOSAIC_SUFFIX
from .quantify import ESTIMATOR_COLUMNS, ESTIMATOR_TEXT, ESTIMATOR_TITLES

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


# --- report.html -------------------------------------------------------------------------------

_REPORT_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#1a1a1a}
h1{font-size:1.4em;margin:0 0 .3em}
.notice{background:#fde8e8;border:1px solid #c81e1e;color:#7a0e0e;padding:.5em .8em;font-weight:600;margin:.5em 0}
.demo{background:#fff4d6;border:1px solid #b7791f;color:#6b4100;padding:.5em .8em;font-weight:600;margin:.5em 0}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;margin:1em 0}
dl.meta dt{font-weight:600}dl.meta dd{margin:0;word-break:break-all}
table{border-collapse:collapse;margin-top:1em}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:right;vertical-align:middle}
td{white-space:nowrap}
td.id,th.id{text-align:left}
td.notes{white-space:normal;text-align:left;min-width:18em;max-width:28em;font-size:.9em}
th.headline{background:#e8f0fe}
thead th{background:#f0f0f0;position:sticky;top:0}
th[aria-sort]{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tfoot td{font-weight:600;background:#fafafa}
img.thumb{max-width:240px;max-height:180px;display:block;background:#1c1c1c}
.na{color:#888}
"""

# Sorting by clicking a header; rows carry their sort keys in data-sort, so shown text can be formatted.
_REPORT_JS = """
(function(){
  var table=document.getElementById('cohort');if(!table)return;
  var body=table.tBodies[0];
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    if(!th.dataset.type)return;
    th.setAttribute('aria-sort','none');th.tabIndex=0;
    function sort(){
      var asc=th.getAttribute('aria-sort')!=='ascending', col=th.cellIndex, num=th.dataset.type==='num';
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[col].dataset.sort, y=b.cells[col].dataset.sort;
        if(x===''||x===undefined)return 1; if(y===''||y===undefined)return -1;
        var d=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});
        return asc?d:-d;
      });
      rows.forEach(function(r){body.appendChild(r);});
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){
        if(o.dataset.type)o.setAttribute('aria-sort','none');
      });
      th.setAttribute('aria-sort',asc?'ascending':'descending');
    }
    th.addEventListener('click',sort);
    th.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();sort();}});
  });
})();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, empty and nan cells."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _num_cell(value: Any, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return '<td data-sort=""><span class="na">n/a</span></td>'
    shown = f"{number:.{digits}f}" if digits else f"{int(number)}"
    return f'<td data-sort="{number!r}">{shown}</td>'


def _fraction_cell(row: dict, column: str = "idc_fraction") -> str:
    fraction = _number(row.get(column))
    if fraction is None:
        return '<td data-sort=""><span class="na">n/a</span></td>'
    low, high = _number(row.get(f"{column}_ci95_low")), _number(row.get(f"{column}_ci95_high"))
    interval = f" [{low:.3f}&ndash;{high:.3f}]" if low is not None and high is not None else ""
    return f'<td data-sort="{fraction!r}">{fraction:.3f}{interval}</td>'


def _link_if_exists(out_dir: Path, name: str, text: str) -> str:
    if not (out_dir / name).is_file():
        return ""
    return f'<a href="{_esc(quote(name))}">{_esc(text)}</a>'


def _estimator_order(headline: str) -> list[str]:
    """The headline estimator first, then the others in their usual order."""
    return [headline] + [name for name in ESTIMATOR_COLUMNS if name != headline]


def _patient_row(out_dir: Path, row: dict, labelled: bool, is_cohort: bool, headline: str = "counted") -> str:
    patient_id = str(row.get("patient_id", ""))
    cells = [f'<td class="id" data-sort="{_esc(patient_id)}">{_esc(patient_id)}</td>']
    if is_cohort:
        cells.append("<td></td>")
    else:
        stem = safe_file_stem(patient_id)
        mosaic = f"{stem}{MOSAIC_SUFFIX}"
        if (out_dir / mosaic).is_file():
            href = _esc(quote(mosaic))
            cells.append(
                f'<td><a href="{href}"><img class="thumb" src="{href}" loading="lazy" '
                f'alt="mosaic of patient {_esc(patient_id)}"></a></td>'
            )
        else:
            cells.append('<td><span class="na">no mosaic</span></td>')
    cells += [_num_cell(row.get(k), 0) for k in ("n_patches", "n_scored", "n_failed")]
    for name in _estimator_order(headline):
        cells.append(_fraction_cell(row, ESTIMATOR_COLUMNS[name]))
    cells.append(_num_cell(row.get("mean_prob_idc")))
    notes = str(row.get("notes") or "")
    cells.append(f'<td class="notes">{_esc(notes)}</td>' if notes else "<td></td>")
    if labelled:
        metrics = ("true_idc_fraction", "sensitivity", "specificity", "balanced_accuracy")
        cells += [_num_cell(row.get(k)) for k in metrics]
    if is_cohort:
        links = [_link_if_exists(out_dir, "summary.csv", "summary.csv")]
    else:
        stem = safe_file_stem(patient_id)
        links = [
            _link_if_exists(out_dir, f"{stem}.csv", "CSV"),
            _link_if_exists(out_dir, f"{stem}{GEOJSON_SUFFIX}", "GeoJSON"),
        ]
    cells.append('<td class="id">' + " ".join(link for link in links if link) + "</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _counted(n: Any, one: str, many: str | None = None) -> str:
    """'1 patient', '3 patients', '? patients' (unknown)."""
    return f"{n} {one}" if n == 1 else f"{'?' if n is None else n} {many or one + 's'}"


def _demo_warning(model: dict) -> str | None:
    """run.json's warning about a demo or unverified model (runs of 0.1 recorded only the flag)."""
    if not model.get("demo"):
        return None
    return model.get("demo_warning") or DEMO_WARNING


def _demo_tag(model: dict) -> str | None:
    warning = _demo_warning(model)
    return None if warning is None else warning.split(" ", 1)[0]  # "DEMO" or "UNVERIFIED"


def _run_meta(out_dir: Path, run_info: dict, summary_rows: list[dict]) -> list[tuple[str, str]]:
    """(label, escaped html) pairs describing the model and the run."""
    model = run_info.get("model", {})
    arguments = run_info.get("arguments", {})
    counts = run_info.get("counts", {})
    started = run_info.get("timings", {}).get("started_unix")
    threshold = arguments.get("threshold")
    if threshold is None and summary_rows:
        threshold = summary_rows[0].get("threshold")
    meta = [
        (
            "Model",
            _esc(Path(str(model.get("path", "unknown"))).name)
            + (f" <strong>({_esc(_demo_tag(model))})</strong>" if _demo_tag(model) else ""),
        ),
        ("Model sha256", _esc(model.get("sha256", "unknown"))),
        ("Trained on", _esc(model.get("trained_on", "unknown"))),
        ("Threshold", _esc(f"prob_idc >= {float(threshold):.4f}") if _number(threshold) is not None else "unknown"),
    ]
    if counts:
        meta.append(
            (
                "Counts",
                _esc(
                    f"{_counted(counts.get('patients'), 'patient')}, "
                    f"{_counted(counts.get('patches'), 'patch', 'patches')}, "
                    f"{counts.get('scored', '?')} scored, {counts.get('failed', '?')} failed"
                ),
            )
        )
    if _number(started) is not None:
        meta.append(("Run started", _esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started))))))
    version = run_info.get("versions", {}).get("idc")
    if version:
        meta.append(("idc version", _esc(version)))
    files = " ".join(
        link
        for link in (
            _link_if_exists(out_dir, "summary.csv", "summary.csv"),
            _link_if_exists(out_dir, "run.json", "run.json"),
        )
        if link
    )
    if files:
        meta.append(("Files", files))
    return meta


def _header_cell(text: str, sort_type: str | None, css_class: str) -> str:
    attributes = ' scope="col"'
    if css_class:
        attributes += f' class="{css_class}"'
    if sort_type:
        attributes += f' data-type="{sort_type}"'
    return f"<th{attributes}>{_esc(text)}</th>"


def report_html(out_dir: Path, summary_rows: list[dict], run_info: dict) -> str:
    """The text of report.html for the reports in ``out_dir`` (links only to files that exist there)."""
    from .engine import COHORT_ID  # engine imports heavy-ish modules; only needed here

    out_dir = Path(out_dir)
    patients = [r for r in summary_rows if r.get("patient_id") != COHORT_ID]
    cohort = [r for r in summary_rows if r.get("patient_id") == COHORT_ID]
    labelled = any((_number(r.get("n_labelled")) or 0) > 0 for r in summary_rows)
    warning = _demo_warning(run_info.get("model", {}))
    headline = run_info.get("model", {}).get("fraction_headline", "counted")
    headline = headline if headline in ESTIMATOR_COLUMNS else "counted"
    headline_why = (
        run_info.get("model", {}).get("fraction_headline_why") or "the model carries no measurement of the others"
    )
    headers = [
        ("Patient", "str", "id"),
        ("Mosaic", None, ""),
        ("Patches", "num", ""),
        ("Scored", "num", ""),
        ("Failed", "num", ""),
    ]
    headers += [
        (ESTIMATOR_TITLES[name] + " [95% interval]", "num", "headline" if name == headline else "")
        for name in _estimator_order(headline)
    ]
    headers += [("Mean prob_idc", "num", ""), ("Notes", "str", "")]
    if labelled:
        headers += [
            ("True IDC fraction", "num", ""),
            ("Sensitivity", "num", ""),
            ("Specificity", "num", ""),
            ("Balanced accuracy", "num", ""),
        ]
    headers.append(("Files", None, "id"))
    head = "".join(_header_cell(text, kind, cls) for text, kind, cls in headers)
    body = "\n".join(_patient_row(out_dir, r, labelled, False, headline) for r in patients)
    foot = "\n".join(_patient_row(out_dir, r, labelled, True, headline) for r in cohort)
    meta = "\n".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in _run_meta(out_dir, run_info, summary_rows))
    demo_banner = f'<p class="demo">{_esc(warning)}</p>' if warning else ""
    # no network: the policy allows only this page's own script and style, and images from disk
    csp = (
        f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_REPORT_CSS)}; "
        f"script-src {_csp_hash(_REPORT_JS)}; base-uri 'none'; form-action 'none'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>IDC review report ({_esc(RESEARCH_NOTICE)})</title>
<style>{_REPORT_CSS}</style>
</head>
<body>
<h1>IDC review report</h1>
<p class="notice">{_esc(RESEARCH_NOTICE.upper())}. A model&rsquo;s estimate of invasive ductal carcinoma per patch,
for research review beside the slides.</p>
{demo_banner}
<dl class="meta">
{meta}
</dl>
<p class="headline"><strong>{_esc(ESTIMATOR_TITLES[headline])}</strong> (first column; {_esc(headline_why)}):
{_esc(ESTIMATOR_TEXT[headline])}</p>
<p>{
        "".join(
            f"<strong>{_esc(ESTIMATOR_TITLES[name])}</strong>: {_esc(ESTIMATOR_TEXT[name])} "
            for name in _estimator_order(headline)[1:]
        )
    }Notes say when a patient was in the model's training data,
when its colours lie outside the training patients' and when too few patches were scored.
Mosaics: tissue rebuilt from the patches at their slide x/y, prob_idc as a heatmap (blue 0, red 1) with
predicted IDC outlined; beside it the ground-truth labels where the file names carry them. Click a header to sort.</p>
<table id="cohort">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
<tfoot>
{foot}
</tfoot>
</table>
<script>{_REPORT_JS}</script>
</body>
</html>
"""


def write_report_html(out_dir: Path, summary_rows: list[dict], run_info: dict) -> Path:
    """Write ``report.html`` into ``out_dir`` atomically; returns its path."""
    target = Path(out_dir) / REPORT_NAME
    with atomic_path(target) as handle:
        handle.write(report_html(out_dir, summary_rows, run_info))
    return target
