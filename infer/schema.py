"""What idc-infer's reports are made of, in one place: the status codes of a patch row, the columns of the
per-patient CSV and of summary.csv, and the id of the cohort's row. Every module takes them from here."""

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
PATCH_COLUMNS = ("path", "x", "y", "width_px", "height_px", "prob_idc", "pred", "label", "status", "message")
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
