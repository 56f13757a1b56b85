"""REST routers under ``/api/v1``."""
