"""Development support: the stand-ins for Chatwoot, the LLM and Evolution API, webhook payload
builders, the redis-server launcher and network helpers shared by the tests, the benchmarks,
the demo and the container smoke test.

Not part of the installed package (pyproject.toml packages only ``buffer_service``): nothing in
``buffer_service`` may import from here. Importable from a checkout of the repository.
"""
