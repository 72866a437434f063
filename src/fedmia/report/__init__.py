"""The report: tables, findings, privacy–utility and Table 2, figures (DataFrames in, out).

Input everywhere is the concatenation of attack-stage tables (:mod:`fedmia.report.tables`
says what a row holds). :mod:`~fedmia.report.tables` holds the single-round selections,
the summary and the paper's Table 1 layout; :mod:`~fedmia.report.findings` the paper's
findings as tested claims; :mod:`~fedmia.report.utility` the privacy–utility table and
Table 2; :mod:`~fedmia.report.figures` every figure. None imports torch.
"""
