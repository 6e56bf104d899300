"""Dataset checks and preparation: any supported file in, canonical split JSONL files out.

Public API (the trainer and the CLI use these names)::

    prepare_dataset(source, out, *, fmt="auto", tokenizer=None, max_seq_len=1024,
                    pii="redact", seed=0, splits=(0.8, 0.1, 0.1), overwrite=False) -> DataReport
    check_dataset(source, *, fmt="auto", tokenizer=None, max_seq_len=1024,
                  pii="redact") -> DataReport
    load_tokenizer(base_path)       the base tokenizer, for the length check
    read_split(path) / read_report(folder)

Canonical rows and input formats are described in `train.data.formats`; line numbers in
`train.data.loaders`; the order of checks in `train.data.pipeline`.

Nothing here imports torch or transformers at import time (only `load_tokenizer` does, when
called).
"""

from train.data.formats import FORMATS, FormatChoice, FormatName
from train.data.lengths import load_tokenizer
from train.data.pii import PII_POLICIES, PiiPolicy
from train.data.pipeline import (
    REPORT_FILE,
    SPLIT_FILES,
    NoUsableRows,
    check_dataset,
    prepare_dataset,
    read_report,
    read_split,
)
from train.data.report import REASONS, SPLIT_NAMES, DataReport, Problem

__all__ = [
    "FORMATS",
    "PII_POLICIES",
    "REASONS",
    "REPORT_FILE",
    "SPLIT_FILES",
    "SPLIT_NAMES",
    "DataReport",
    "FormatChoice",
    "FormatName",
    "NoUsableRows",
    "PiiPolicy",
    "Problem",
    "check_dataset",
    "load_tokenizer",
    "prepare_dataset",
    "read_report",
    "read_split",
]
