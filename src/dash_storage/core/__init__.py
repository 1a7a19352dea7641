"""The core: settings, errors, retries, the pool (``Database``), ids, records and validation.

Everything else builds on these modules; they import nothing from the rest of the package except
the embedded server provisioning in ``dash_storage.server``.
"""
