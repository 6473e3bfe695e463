"""What a failed video job tells its owner: the code and message of its failure."""

from __future__ import annotations

from mediagate.protocol.errors import ModerationBlocked
from mediagate.protocol.work import VideoGeneration
from mediagate.stores import StoreUnavailable


def video_failure(error: Exception, model_id: str, generation: VideoGeneration) -> tuple[str, str]:
    """The code and message a failed job shows: a refusal says so; a file store down past
    ``store_retry_s`` and a model failure (re-running would fail the same way) too."""
    if isinstance(error, ModerationBlocked):
        return "moderation_blocked", error.message
    if isinstance(error, StoreUnavailable):
        message = "the file store stayed unavailable for this video; please submit it again"
        return "storage_unavailable", message
    if isinstance(error, ValueError) and generation.input_reference:
        return "generation_failed", f"the input_reference image cannot be used: {error}"
    return "generation_failed", f"model {model_id} failed to generate this video"
