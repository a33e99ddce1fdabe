"""Task families: data loading and validation, model heads, metrics."""
