"""Analyses of finished grids: results tables, representation similarity, convergence.

Everything here works on plain records and arrays (fetched from MLflow by the tasks),
so a finished grid can be analysed again without a model or a GPU.
"""
