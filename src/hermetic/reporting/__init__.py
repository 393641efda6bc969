"""The reporting service's core (issue 12): sealed sign-in event batches, a synthetic
tenant that seals them as member devices do, and the incremental application-insights
aggregate and its report.

Sans-IO library code: the enclave service, the client-side baseline and the demo all run
this. ``docs/reporting.md`` specifies the batch layout, its associated data, the aggregate's
canonical encoding and the report's definitions.
"""

from hermetic.reporting.aggregate import (
    AbsorbResult,
    Aggregate,
    AppUsage,
    Rejected,
    Report,
    SealedBatch,
    Split,
    WeekUsage,
    baseline_report,
)
from hermetic.reporting.format import (
    SCHEMA_VERSION,
    BatchOpener,
    Event,
    EventBatch,
    open_batch,
    seal_batch,
)
from hermetic.reporting.generator import SyntheticTenant, generate_tenant

__all__ = [
    "SCHEMA_VERSION",
    "AbsorbResult",
    "Aggregate",
    "AppUsage",
    "BatchOpener",
    "Event",
    "EventBatch",
    "Rejected",
    "Report",
    "SealedBatch",
    "Split",
    "SyntheticTenant",
    "WeekUsage",
    "baseline_report",
    "generate_tenant",
    "open_batch",
    "seal_batch",
]
