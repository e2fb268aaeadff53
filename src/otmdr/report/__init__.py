"""Reports: tables over seeds and the plots of a comparison."""

from .compare import write_compare_report
from .tables import aggregate, format_table

__all__ = ["aggregate", "format_table", "write_compare_report"]
