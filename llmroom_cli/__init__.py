"""llmroom: share your local LLM server in an LLM room."""

__version__ = "0.1.0"
