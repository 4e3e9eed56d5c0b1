"""What idc-infer's reports are made of, in one place: the status codes of a patch row, the per-patient CSV's
row (PatchRow) and columns, summary.csv's columns, and the id of the cohort's row. Every module takes them
from here."""

from __future__ import annotations

from dataclasses import dataclass, fields

# on every report: CSVs (a column), summary, GeoJSON, mosaic, HTML, run.json
RESEARCH_NOTICE = "research use only; not for diagnosis"

# status of a patch row: "ok" (scored) or why not
STATUS_OK = "ok"
STATUS_EMPTY = "empty_file"
STATUS_NOT_IMAGE = "not_an_image"
STATUS_CORRUPT = "corrupt_image"
STATUS_UNREADABLE = "unreadable"
STATUS_MISSING = "missing"
STATUS_UNDERSIZED = "undersized_refused"
STATUS_OVERSIZED = "oversized_refused"
STATUS_UNSUPPORTED = "unsupported_pixels"
STATUS_PENDING = "pending"  # decoded, its quality check and tensor still to come (finish_batch); never in a row
STATUS_MODEL_ERROR = "model_error"

# quality control: decodable, but not tissue worth a score (not counted as failed)
STATUS_BACKGROUND = "background"
STATUS_BLURRED = "blurred"
QC_STATUSES = (STATUS_BACKGROUND, STATUS_BLURRED)

# the one row of a slide that yields no tiles, and of a patient no Dask worker could score
STATUS_SLIDE_UNREADABLE = "slide_unreadable"
STATUS_NO_MPP = "slide_without_mpp"
STATUS_WORKER_FAILED = "worker_failed"


# the per-patient CSV and summary.csv
@dataclass(frozen=True, slots=True)
class PatchRow:
    """One row of a per-patient CSV, as the CSV writer and the review sinks receive it. x, y, width_px and
    height_px are in the frame of the patient's coordinates (a patch file's own pixels; a slide tile's or a
    QuPath region's level-0 pixels); prob_idc and pred are None where the patch was not scored."""

    path: str
    x: int | None = None
    y: int | None = None
    width_px: int | None = None
    height_px: int | None = None
    prob_idc: float | None = None
    pred: int | None = None
    label: int | None = None
    status: str = STATUS_OK
    message: str = ""

    @property
    def scored(self) -> bool:
        return self.status == STATUS_OK and self.prob_idc is not None

    @property
    def notice(self) -> str:
        """The CSV's last column: a per-patient CSV travels alone (mailed, opened in Excel) and says what it is."""
        return RESEARCH_NOTICE

    @property
    def placed(self) -> bool:
        """Has a position on the slide (a mosaic cell, a GeoJSON tile)."""
        return self.x is not None and self.y is not None


PATCH_COLUMNS = (*(f.name for f in fields(PatchRow)), "notice")  # the CSV's columns, in this order
SUMMARY_COLUMNS = (
    "patient_id",
    "n_patches",
    "n_scored",
    "n_failed",
    "n_background",
    "n_blurred",
    "n_idc",
    "idc_fraction",
    "idc_fraction_ci95_low",
    "idc_fraction_ci95_high",
    "idc_fraction_adjusted",
    "idc_fraction_adjusted_ci95_low",
    "idc_fraction_adjusted_ci95_high",
    "idc_fraction_expected",
    "idc_fraction_expected_ci95_low",
    "idc_fraction_expected_ci95_high",
    "mean_prob_idc",
    "threshold",
    "n_labelled",
    "true_idc_fraction",
    "sensitivity",
    "specificity",
    "balanced_accuracy",
    "notes",
    "model_sha256",
    "notice",
)
COHORT_ID = "(cohort)"
