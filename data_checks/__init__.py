"""Data validation: readers, formats, Great Expectations suites, LLM-aware checks. No Prefect."""
