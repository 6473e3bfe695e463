"""What an image worker does at the end of each denoising step: stop a batch the
scheduler took back, and decode the partial images that streamed jobs asked for."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from deployments.workers.runner import StoppedAtStep, stop_pipeline
from mediagate.protocol.work import ImageJob, PartialImage, RawImage, preview_steps
from models.encoding import from_raw_image, to_raw_image
from models.previews import can_preview, decode_previews

logger = logging.getLogger(__name__)
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


class BatchStopped(StoppedAtStep):
    """The scheduler took the batch back (to run higher-priority work) mid-way."""


def inpaint_inputs(jobs: list[ImageJob]) -> list[tuple[RawImage, RawImage]]:
    """Each image's input and mask, in the batch's image order (inpaint jobs only)."""
    inputs = []
    for job in jobs:
        assert job.init_image is not None and job.mask_image is not None  # see call_kwargs
        inputs.extend([(job.init_image, job.mask_image)] * job.images)
    return inputs


def keep_outside_masks(images: list[Any], inputs: list[tuple[RawImage, RawImage]]) -> list[Any]:
    """Inpainted images with every pixel outside their mask taken from the input: the
    pipeline redraws the whole image through the VAE, and what was not to be edited
    must come back as it was (OpenAI's edits change only where the mask is clear)."""
    from PIL import Image

    return [
        Image.composite(image.convert("RGB"), from_raw_image(original), from_raw_image(mask))
        for image, (original, mask) in zip(images, inputs, strict=True)
    ]


class PreviewPlan:
    """Which images of a batch get a preview after which step (``preview_steps`` of
    each job's ``partial_images``), decoded and handed over as they are made."""

    def __init__(self, jobs: list[ImageJob], hand_over: Callable[[PartialImage], None]) -> None:
        self.jobs = jobs
        self.hand_over = hand_over
        self._steps: list[list[int]] | None = None  # per job, once the steps run are known
        self.failed = False  # a decode failed: the rest of the batch goes without

    def after_step(self, pipeline: Any, step: int, latents: Any) -> None:
        if self._steps is None:  # an edit runs only its strength's share of the steps
            steps_run = (
                getattr(pipeline, "_num_timesteps", None) or self.jobs[0].num_inference_steps
            )
            self._steps = [preview_steps(int(steps_run), job.partial_images) for job in self.jobs]
        wanted: list[tuple[int, int, int, int]] = []  # job, image of the job, row, preview
        row = 0
        for job_index, (job, steps) in enumerate(zip(self.jobs, self._steps, strict=True)):
            if step in steps:
                wanted += [(job_index, i, row + i, steps.index(step)) for i in range(job.images)]
            row += job.images
        if not wanted or self.failed or not can_preview(pipeline, latents):
            return
        first = self.jobs[0]
        rows = [row for _, _, row, _ in wanted]
        try:
            images = decode_previews(
                pipeline, latents[rows], width=first.width, height=first.height
            )
            if first.task == "inpaint":
                inputs = inpaint_inputs(self.jobs)
                images = keep_outside_masks(images, [inputs[row] for row in rows])
        except Exception:  # a preview is a courtesy: the batch goes on without them
            logger.exception("previews of %s failed; no more for this batch", first.request_id)
            self.failed = True
            return
        for (job_index, image_index, _, preview), image in zip(wanted, images, strict=True):
            self.hand_over(
                PartialImage(
                    job_index=job_index,
                    image_index=image_index,
                    partial_image_index=preview,
                    image=to_raw_image(image),
                )
            )


def step_callback(
    stop: threading.Event | None, previews: PreviewPlan | None
) -> StepCallback | None:
    """A ``callback_on_step_end`` that ends the loop once ``stop`` is set and decodes
    the previews due after each step; None when there is nothing to do."""
    if stop is None and previews is None:
        return None

    def callback(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
        if stop is not None and stop.is_set():
            try:
                stop_pipeline(pipeline, step)
            except StoppedAtStep as stopped:
                raise BatchStopped(str(stopped)) from None
        if previews is not None and "latents" in kwargs:
            previews.after_step(pipeline, step, kwargs["latents"])
        return kwargs

    return callback
