"""tureen: serve Hugging Face LLM checkpoints fast."""

from tureen.outputs import CompletionOutput, Logprob, RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):  # keep `import tureen` light: LLM pulls in torch
    if name == "LLM":
        from tureen.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
