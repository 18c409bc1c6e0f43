"""Reports: the per-sample table, its summary, the verdict, the JSON file, gates and figures.

:class:`AuditReport` is what :func:`conservcheck.audit` returns; :mod:`.summary` computes its statistics,
:mod:`.verdict` its verdict, :mod:`.schema` its JSON schema, :mod:`.gate` the ``--fail-if`` conditions,
:mod:`.reproducibility` what two runs promise to agree on, and :mod:`.plots` the paper's figures
(matplotlib, imported only when drawing).
"""

from conservcheck.report.audit_report import AuditReport, compare
from conservcheck.report.reproducibility import TOLERANCE
from conservcheck.report.schema import SCHEMA_VERSION, report_schema
from conservcheck.report.verdict import FLOOR_FACTOR, Verdict

__all__ = ["FLOOR_FACTOR", "SCHEMA_VERSION", "TOLERANCE", "AuditReport", "Verdict", "compare", "report_schema"]
