"""The vision-language model stage: a managed vLLM server (or an external endpoint) and the agent that turns a
query into masks by talking to it.

Modules: :mod:`~pipeline.vlm.server` (``vllm serve`` lifecycle; stdlib only), :mod:`~pipeline.vlm.client`
(OpenAI-compatible requests, reasoning and JSON handling; needs ``openai``), :mod:`~pipeline.vlm.prompts`
(our prompt texts and answer schemas), :mod:`~pipeline.vlm.overlay` (numbered candidate renderings),
:mod:`~pipeline.vlm.agent` (the propose → segment → review loop) and :mod:`~pipeline.vlm.commands`
(``python -m pipeline vlm serve|status|stop``). Importing this package imports none of them.
"""

__all__: list[str] = []
