"""pd-bench: a serving benchmark for any OpenAI-compatible endpoint (`pd-bench`, `python -m pd.bench`).

workload.py makes the requests, client.py streams and times them, report.py aggregates.
"""
