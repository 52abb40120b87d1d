"""The VLM agent, run inside the segment worker in query mode: it turns a query into masks by talking to an
OpenAI-compatible (vLLM) endpoint that the driver started or was pointed at.

Modules: :mod:`~pipeline.stages.agent.client` (requests, reasoning and JSON handling; needs ``openai``),
:mod:`~pipeline.stages.agent.prompts` (prompt texts and answer schemas), :mod:`~pipeline.stages.agent.overlay`
(numbered candidate renderings) and :mod:`~pipeline.stages.agent.loop` (propose → segment → review).
The server's lifecycle is the driver's: :mod:`pipeline.driver.vlm_server`.
"""

__all__: list[str] = []
