"""Records to batches: reading records, tokenizing both sides, spans, shared vocabulary, collation."""
