"""The user-facing layer: LLM / AsyncLLM clients, the OpenAI server, tokenization and detokenization."""

from ipc.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "RequestOutputKind", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in the engine (torch); importing the frontend package alone must stay light.
    if name == "LLM":
        from frontend.llm import LLM

        return LLM
    if name in ("CompletionOutput", "RequestOutput"):
        from frontend import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
