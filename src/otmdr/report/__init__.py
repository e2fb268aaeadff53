"""Reports: tables over seeds, paired differences, and the plots of a comparison."""

from .compare import comparison_tables, edge_notes, search_table, write_compare_report
from .tables import aggregate, format_table

__all__ = ["aggregate", "format_table", "comparison_tables", "edge_notes", "search_table", "write_compare_report"]
