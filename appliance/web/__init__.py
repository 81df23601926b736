"""The appliance's one HTTP app (ASGI: Starlette on uvicorn): DICOMweb, status page, metrics.

Owns: assembling routes contributed by capabilities and serving them in a daemon thread. Each
capability exposes ``routes(daemon) -> list[BaseRoute]``; handlers stay thin and call the core.
"""
