"""The driver: everything that runs in the user's interpreter with the light dependencies only
(pydantic, pyyaml, numpy, pillow, rich, openai; FastAPI/uvicorn for ``serve``).

It never imports torch or a model library. It plans runs, starts one stage worker per env
(:mod:`~pipeline.driver.workers`, through the single process choke point :mod:`~pipeline.driver.proc`),
keeps them warm (:mod:`~pipeline.driver.engine`), manages the vLLM server
(:mod:`~pipeline.driver.vlm_server`) and talks to the user (:mod:`~pipeline.driver.cli`, batch, serve).
Stage workers and backends live in :mod:`pipeline.stages` and :mod:`pipeline.backends`; the two sides share
only the contract at the package's top level: config, handoff (manifests and file names), errors, atomic
writes and image I/O.
"""

__all__: list[str] = []
