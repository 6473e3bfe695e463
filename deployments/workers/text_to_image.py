"""TextToImage: a GPU replica that runs one catalog model's diffusers pipeline.

It loads its model in the constructor, warms up, and runs batches of same-shape
jobs (formed by the scheduler) as single pipeline calls. The edits a catalog entry
lists (image-to-image, inpaint) run on pipelines built from the same loaded
components (diffusers' ``AutoPipelineFor*.from_pipe``: no second copy of the
weights). It returns raw pixels, never PIL images or tensors, and leaves encoding to
the router: the replica's time is for the pipeline. One replica runs one batch at a
time, so its ``max_ongoing_requests`` is 1 and waiting work stays in the scheduler's
queue.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from deployments.streams import items_until
from deployments.workers.image_steps import (
    PreviewPlan,
    inpaint_inputs,
    keep_outside_masks,
    step_callback,
)
from deployments.workers.runner import PipelineLoader, load_warm_pipeline
from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import GenerationFailed, InvalidRequest
from mediagate.protocol.work import (
    ImageJob,
    ImageResult,
    ImageTask,
    PartialImage,
    RawImage,
    image_seeds,
    pipeline_call_kwargs,
)
from models.encoding import from_raw_image, to_raw_image

logger = logging.getLogger(__name__)


def replica_id() -> str:
    """This Serve replica's id ("" outside Serve)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not running as a Serve replica (tests, benchmarks)
        return ""


def edit_pipelines(spec: ModelSpec, pipeline: Any) -> dict[ImageTask, Any]:
    """The edit pipelines ``spec`` lists, sharing ``pipeline``'s loaded components. A
    simulated pipeline (not diffusers') serves them itself: it only paces the steps."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

    builders: dict[ImageTask, Any] = {
        "image-to-image": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }
    wanted = [task for task in builders if task in spec.tasks]
    if not isinstance(pipeline, DiffusionPipeline):
        return dict.fromkeys(wanted, pipeline)
    if spec.edit_by == "instruction":  # its own pipeline takes the image as a condition
        builders["image-to-image"] = type(pipeline)
    return {
        task: pipeline if builders[task] is type(pipeline) else builders[task].from_pipe(pipeline)
        for task in wanted
    }


_ACCEPTED: dict[type, frozenset[str] | None] = {}


def accepted_arguments(pipeline_class: type) -> frozenset[str] | None:
    """The keyword arguments a pipeline class's call takes (None: any, it has **kwargs);
    read once per class."""
    if pipeline_class not in _ACCEPTED:
        parameters = inspect.signature(pipeline_class.__call__).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        _ACCEPTED[pipeline_class] = None if takes_any else frozenset(p.name for p in parameters)
    return _ACCEPTED[pipeline_class]


def call_kwargs(
    pipeline: Any, jobs: list[ImageJob], fixed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The pipeline call of a batch: prompts per image, ``fixed`` (the catalog's
    ``pipeline_arguments``), and for edits each image's input (and mask) and the batch's
    strength. Only what the pipeline takes is passed: an image-to-image pipeline that
    takes its size from its input is not passed width and height."""
    kwargs = {**(fixed or {}), **pipeline_call_kwargs(jobs)}
    first = jobs[0]
    if first.task != "text-to-image":
        incomplete = [
            job
            for job in jobs
            if job.init_image is None or (job.mask_image is None and job.task == "inpaint")
        ]
        if incomplete:
            raise InvalidRequest(f"an {first.task} job came without its input image or mask")
        kwargs["image"] = [
            from_raw_image(job.init_image)
            for job in jobs
            for _ in range(job.images)
            if job.init_image
        ]
        if first.strength is not None:
            kwargs["strength"] = first.strength
        if first.task == "inpaint":
            kwargs["mask_image"] = [
                from_raw_image(job.mask_image)
                for job in jobs
                for _ in range(job.images)
                if job.mask_image
            ]
    accepted = accepted_arguments(type(pipeline))
    if accepted is None:
        return kwargs
    if "max_area" in accepted:  # FLUX.1 Kontext rescales to an area of its own otherwise
        kwargs |= {"max_area": first.width * first.height, "_auto_resize": False}
    return {name: value for name, value in kwargs.items() if name in accepted}


def generate_batch(
    pipeline: Any,
    jobs: list[ImageJob],
    stop: threading.Event | None = None,
    worker: str = "",
    previews: PreviewPlan | None = None,
    fixed: Mapping[str, Any] | None = None,
    model_version: str = "",
) -> list[ImageResult]:
    """Run one pipeline call for same-shape ``jobs`` and split its images by job, as raw
    pixels; setting ``stop`` ends it at the next denoising step with ``BatchStopped``;
    ``previews`` decodes the partial images of streamed jobs as the steps go; ``fixed``
    are the catalog's ``pipeline_arguments``; ``model_version`` names the weights."""
    import torch

    if len({job.batch_key for job in jobs}) != 1:
        raise InvalidRequest("a batch must share its task, size, steps, guidance and strength")
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in image_seeds(jobs)]
    extra: dict[str, Any] = {}
    callback = step_callback(stop, previews)
    if callback is not None:
        extra["callback_on_step_end"] = callback
    started = time.perf_counter()
    kwargs = call_kwargs(pipeline, jobs, fixed)
    output = pipeline(**kwargs, generator=generators, output_type="pil", **extra)
    inference_s = time.perf_counter() - started
    made = output.images
    if jobs[0].task == "inpaint":
        made = keep_outside_masks(made, inpaint_inputs(jobs))
    images = [to_raw_image(image) for image in made]
    results: list[ImageResult] = []
    offset = 0
    for job in jobs:
        results.append(
            ImageResult(
                request_id=job.request_id,
                images=images[offset : offset + job.images],
                batch_images=len(images),
                inference_s=inference_s,
                worker=worker,
                model_version=model_version,
                timings_ms={"pipeline": inference_s * 1000},
            )
        )
        offset += job.images
    return results


def warm_up_job(spec: ModelSpec) -> ImageJob:
    """One 1-step job of the model's first task at its default size (an edit-only
    model edits a grey image): what a new replica runs before it takes work."""
    width, height = spec.default_size
    task = next(task for task in ("text-to-image", "image-to-image") if task in spec.tasks)
    grey = RawImage(mode="RGB", width=width, height=height, pixels=b"\x80" * (width * height * 3))
    return ImageJob(
        request_id="warm-up",
        prompt="warm up",
        width=width,
        height=height,
        num_inference_steps=1,
        guidance_scale=spec.defaults.guidance_scale,
        num_images_per_prompt=1,
        seed=0,
        output_format="png",
        task=task,
        init_image=grey if task == "image-to-image" else None,
    )


class TextToImage:
    """Holds one loaded text-to-image pipeline and generates batches on request."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        cache_dir: str,
        load: PipelineLoader | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.spec = spec
        self.pipeline = load_warm_pipeline(
            self.spec,
            cache_dir=cache_dir,
            load=load,
            torch_threads=torch_threads,
            warm_up=self._warm_up,
        )
        self.pipelines: dict[ImageTask, Any] = {
            "text-to-image": self.pipeline,
            **edit_pipelines(spec, self.pipeline),
        }
        self._one_at_a_time = asyncio.Lock()
        self.replica_id = replica_id()

    def _warm_up(self, pipeline: Any) -> None:
        generate_batch(pipeline, [warm_up_job(self.spec)], fixed=self.spec.pipeline_arguments)

    def placement_report(self) -> dict[str, Any]:
        """Where this replica runs and what it runs on, for operators: the GPUs Ray gave
        it, what CUDA_VISIBLE_DEVICES says, and the pipeline's device and dtype."""
        import ray

        device = getattr(self.pipeline, "device", "cpu")
        dtype = getattr(self.pipeline, "dtype", "float32")
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": list(ray.get_gpu_ids()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": getattr(device, "type", str(device)),
            "dtype": str(dtype).removeprefix("torch."),
        }

    async def generate(self, jobs: list[ImageJob]) -> list[ImageResult]:
        """Generate a batch off the event loop so health checks stay answered.

        A caller that cancels the call (the scheduler preempting the batch) stops the
        pipeline at its next step. Serve may route the next batch here at once; it
        waits until the stopped one has left the pipeline.
        """
        return await self._generate(jobs, previews=None)

    async def generate_streaming(
        self, jobs: list[ImageJob]
    ) -> AsyncIterator[PartialImage | list[ImageResult]]:
        """``generate``, streamed (``handle.options(stream=True)``): the partial images
        of the jobs that ask for them (``partial_images``) as the steps make them, then
        the batch's results. Cancelling it stops the pipeline as ``generate`` does."""
        loop = asyncio.get_running_loop()
        made: asyncio.Queue[PartialImage] = asyncio.Queue()

        def hand_over(partial: PartialImage) -> None:  # called on the pipeline's thread
            loop.call_soon_threadsafe(made.put_nowait, partial)

        run = asyncio.ensure_future(self._generate(jobs, previews=PreviewPlan(jobs, hand_over)))
        try:
            async for partial in items_until(run, made):
                yield partial
            yield run.result()
        finally:
            if not run.done():  # the caller left or took the batch back: stop the pipeline
                run.cancel()
                await asyncio.wait({run})

    async def _generate(
        self, jobs: list[ImageJob], previews: PreviewPlan | None
    ) -> list[ImageResult]:
        stop = threading.Event()
        pipeline = self.pipelines.get(jobs[0].task)
        if pipeline is None:
            raise InvalidRequest(f"model {self.spec.id} does not serve {jobs[0].task}")
        # Serve may send the next batch as soon as a call is cancelled, while the stopped
        # batch still finishes its step: one pipeline call at a time, or the two would
        # share the pipeline (and its interrupt flag).
        async with self._one_at_a_time:
            run = asyncio.ensure_future(
                asyncio.to_thread(
                    generate_batch,
                    pipeline,
                    jobs,
                    stop,
                    self.replica_id,
                    previews,
                    self.spec.pipeline_arguments,
                    self.spec.version,
                )
            )
            try:
                return await asyncio.shield(run)
            except asyncio.CancelledError:
                stop.set()
                await asyncio.wait({run})
                if not run.cancelled():
                    run.exception()  # BatchStopped, or whatever ended it: nobody awaits it
                logger.info("batch %s stopped early", [job.request_id for job in jobs])
                raise
            except InvalidRequest:
                raise
            except Exception as error:
                logger.exception("generation failed for %s", [job.request_id for job in jobs])
                raise GenerationFailed(
                    f"model {self.spec.id} failed to generate; please retry"
                ) from error
