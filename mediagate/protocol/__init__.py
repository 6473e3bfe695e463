"""The contracts: the public API's models, the errors, the work that crosses Ray handles
and what schedulers report. Imports nothing of mediagate's.
"""
