"""OpenAI Models API: `GET /v1/models` and `GET /v1/models/{id}`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelObject(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str = Field(description="Model id to pass as `model`.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(description="Unix time the catalog was loaded.")
    owned_by: str = Field(description="Who publishes the model.")
    task: str = Field(description="mediagate extension: text-to-image or text-to-video.")
    tasks: list[str] = Field(
        description="mediagate extension: everything the model serves (text-to-image, "
        "image-to-image, inpaint, text-to-video, image-to-video)."
    )


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelObject] = Field(description="Every model this deployment serves.")
