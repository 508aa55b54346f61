"""Report: the run's summary and HTML report, the Data Docs, the trends, the hospital-wide board and their charts."""
