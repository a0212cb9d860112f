"""Optional screening of prompts and answers with Azure AI Content Safety, and Mistral's guardrail prompt.

Mixtral "does not have any moderation mechanisms" (its model card). As Azure's catalog container does when
`CONTENT_SAFETY_ENDPOINT` is set, every prompt and every answer is screened for Hate, SelfHarm, Sexual and
Violence, in chunks of 1000 characters; a category whose severity is over the threshold (default 2: the
medium and high levels, as Azure's default filter) flags the text. A flagged prompt is a 400 with code
`content_filter`; a flagged answer ends with `finish_reason: content_filter`, its flagged text withheld. A
stream is screened as it goes: its text is released window by window, each once screened, so a flag
mid-stream ends it without sending the flagged window (windows start at 200 characters, so the first text
comes soon, and double up to the 1000 of a chunk, so a long answer costs few calls). When screening
itself fails, the setting decides: fail closed (a 503 for a prompt, `content_filter` for an answer) or
fail open (logged, and served).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from .errors import ContentFiltered, ModelNotReady
from .protocol import Message

log = logging.getLogger(__name__)

CATEGORIES: Final = ("Hate", "SelfHarm", "Sexual", "Violence")
CHUNK_CHARS: Final = 1000  # the catalog container's chunk; the service takes up to 10k characters a call
STREAM_WINDOW_CHARS: Final = 200  # a stream's first screened window; each next one is twice as long, up to a chunk
# Mistral's `safe_prompt`: this system prompt goes before the conversation.
GUARDRAIL: Final = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
                    "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and "
                    "positivity.")
_RETRY_AFTER_S = 5


def with_guardrail(conversation: Sequence[Message]) -> tuple[Message, ...]:
    """The conversation with Mistral's guardrail prompt as its system message (before any of its own)."""
    if conversation and conversation[0].role == "system":
        return (Message("system", f"{GUARDRAIL}\n\n{conversation[0].content}"), *conversation[1:])
    return (Message("system", GUARDRAIL), *conversation)


class Screen:
    """An Azure AI Content Safety client and the rules for what its answers mean."""

    def __init__(self, endpoint: str, *, threshold: int, fail_open: bool, key: str = "",
                 timeout_s: float = 10.0) -> None:
        from azure.ai.contentsafety import ContentSafetyClient

        if key:
            from azure.core.credentials import AzureKeyCredential

            credential = AzureKeyCredential(key)
        else:  # the deployment's managed identity (the role "Cognitive Services User" on the resource)
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        self._client = ContentSafetyClient(endpoint, credential, connection_timeout=timeout_s, read_timeout=timeout_s,
                                           retry_total=1)
        self.threshold = threshold
        self.fail_open = fail_open

    def flagged(self, text: str) -> str | None:
        """The first category over the threshold in any chunk of `text`, or None; raises ScreeningFailed."""
        from azure.ai.contentsafety.models import AnalyzeTextOptions

        for start in range(0, len(text), CHUNK_CHARS):
            try:
                chunk = text[start:start + CHUNK_CHARS]
                result = self._client.analyze_text(AnalyzeTextOptions(text=chunk, categories=list(CATEGORIES),
                                                                      output_type="FourSeverityLevels"))
            except Exception as exc:  # the service, the network or the credential
                log.error("content screening failed (%s)", "served anyway: fail open" if self.fail_open else
                          "fail closed", exc_info=exc)
                if self.fail_open:
                    return None
                raise ScreeningFailed("content screening is unavailable; retry shortly",
                                      retry_after=_RETRY_AFTER_S) from None
            for analysis in result.categories_analysis:
                if (analysis.severity or 0) > self.threshold:
                    return str(analysis.category)
        return None

    def check_prompt(self, texts: Sequence[str], param: str) -> None:
        """Raises ContentFiltered naming the category when a prompt is flagged."""
        for text in texts:
            category = self.flagged(text)
            if category is not None:
                raise ContentFiltered(f"the request input was flagged by Azure AI Content Safety: {category}",
                                      param=param)

    def answer_flagged(self, text: str) -> bool:
        """An answer is withheld when flagged, and when screening fails closed."""
        try:
            return self.flagged(text) is not None
        except ScreeningFailed:
            return True


class ScreeningFailed(ModelNotReady):
    """Screening was unavailable and the server fails closed: a 503 with Retry-After."""
