"""Dockerfile front end: text in, typed instructions and a stage DAG out.

Knows nothing of files, layers or processes, so editors and linters can use it alone.
"""
