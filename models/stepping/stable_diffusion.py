"""The Stable Diffusion denoising loop, one step at a time, for many requests at once.

``StableDiffusionPipeline.__call__`` runs prompt encoding, latent preparation, the
loop and the VAE decode in one call, for one batch that starts and ends together.
Here those are separate, and the loop is per step: each request (``StepState``)
carries its prompt embeddings, its own copy of the pipeline's scheduler (so its
timesteps, step index and any multistep history are its own), its latents and its
generators. ``step`` runs one UNet forward for every request given, whatever step
each is at: the inputs are concatenated (per-sample timesteps, classifier-free
guidance folded in as each request's unconditional and conditional halves), and the
noise prediction is split back so each request takes its own guidance and its own
scheduler step. What is reused from diffusers: ``encode_prompt``,
``prepare_latents``, ``prepare_extra_step_kwargs``, the scheduler, the VAE and the
image processor; only the loop is written here, mirroring the pipeline's (0.42).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mediagate.protocol.work import ImageJob, image_seeds
from models.previews import decode_latents
from models.stepping.placement import held_bytes, move_state


@dataclass(eq=False)
class StepState:
    """One request in the loop: everything its next step needs."""

    job: ImageJob
    scheduler: Any  # this request's own copy
    timesteps: Any  # 1-D tensor
    latents: Any  # (images, C, h, w)
    prompt_embeds: (
        Any  # (2 x images, L, D) with guidance ([negative, positive]), else (images, L, D)
    )
    guidance_scale: float
    guided: bool
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)
    step_index: int = 0
    # SDXL's added conditioning (pooled text embeddings, time ids), halved as the
    # prompt embeddings are: {"text_embeds": ..., "time_ids": ...}; None for SD
    added_cond: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def batch_key(self) -> Hashable:
        """Requests with equal keys can share a forward pass (steps may differ)."""
        return (tuple(self.latents.shape[1:]), self.guided, str(self.latents.dtype))


class StableDiffusionStepper:
    """Runs the loop of a loaded ``StableDiffusionPipeline`` step by step."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        if pipeline.unet.config.time_cond_proj_dim is not None:
            raise ValueError("guidance-embedding UNets (LCM) are not stepped here")
        # each job's scheduler is copied from this one, taken before any call: a pipeline
        # call running beside the loop (image-to-video) changes the pipeline's own
        self.scheduler = copy.deepcopy(pipeline.scheduler)

    def start(self, job: ImageJob) -> StepState:
        """Encode the prompt and prepare the latents and the scheduler, as the pipeline's
        call does before its loop (the same seeds give the same starting noise)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipeline = self.pipeline
        device = pipeline._execution_device
        guided = job.guidance_scale > 1
        with torch.no_grad():
            prompt_embeds, added_cond = self.encode(job, device, guided)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(job.num_inference_steps, device=device)
        generators = [
            torch.Generator(device="cpu").manual_seed(seed) for seed in image_seeds([job])
        ]
        # prepare_latents' noise, scaled by this request's scheduler (the pipeline's own
        # scheduler may have been set to another step count: its initial sigma differs)
        scale = pipeline.vae_scale_factor
        shape = (
            job.images,
            pipeline.unet.config.in_channels,
            job.height // scale,
            job.width // scale,
        )
        noise = randn_tensor(shape, generator=generators, device=device, dtype=prompt_embeds.dtype)
        latents = noise * scheduler.init_noise_sigma
        return StepState(
            job=job,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            latents=latents,
            prompt_embeds=prompt_embeds,
            guidance_scale=job.guidance_scale,
            guided=guided,
            extra_step_kwargs=pipeline.prepare_extra_step_kwargs(generators, 0.0),
            added_cond=added_cond,
        )

    def encode(self, job: ImageJob, device: Any, guided: bool) -> tuple[Any, dict[str, Any] | None]:
        """The prompt embeddings ([negative, positive] with guidance), as the call's."""
        import torch

        prompts = [job.prompt] * job.images
        negatives = [job.negative_prompt] * job.images if job.negative_prompt else None
        positive, negative = self.pipeline.encode_prompt(prompts, device, 1, guided, negatives)
        return (torch.cat([negative, positive]) if guided else positive), None

    def step(self, states: Sequence[StepState]) -> None:
        """One denoising step of every state in ``states`` (equal ``batch_key``), in one
        UNet forward pass; each advances its own step index."""
        import torch

        if not states:
            return
        if len({state.batch_key for state in states}) != 1:
            raise ValueError(
                "states in one forward pass must share their latent shape and guidance"
            )
        inputs, timesteps, embeds = [], [], []
        for state in states:
            t = state.timesteps[state.step_index]
            model_input = torch.cat([state.latents] * 2) if state.guided else state.latents
            model_input = state.scheduler.scale_model_input(model_input, t)
            inputs.append(model_input)
            timesteps.append(t.reshape(1).expand(model_input.shape[0]))
            embeds.append(state.prompt_embeds)
        added = [state.added_cond for state in states]
        added_cond_kwargs = (
            {key: torch.cat([cond[key] for cond in added if cond]) for key in added[0]}
            if added[0]
            else None
        )
        with torch.no_grad():
            noise = self.pipeline.unet(
                torch.cat(inputs),
                torch.cat(timesteps),
                encoder_hidden_states=torch.cat(embeds),
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )[0]
        offset = 0
        for state, model_input in zip(states, inputs, strict=True):
            prediction = noise[offset : offset + model_input.shape[0]]
            offset += model_input.shape[0]
            if state.guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + state.guidance_scale * (conditional - unconditional)
            t = state.timesteps[state.step_index]
            with torch.no_grad():
                state.latents = state.scheduler.step(
                    prediction, t, state.latents, **state.extra_step_kwargs, return_dict=False
                )[0]
            state.step_index += 1

    def offload(self, state: StepState) -> None:
        move_state(state, "cpu")

    def reload(self, state: StepState) -> None:
        move_state(state, self.pipeline._execution_device)

    def held_bytes(self, state: StepState) -> int:
        """Memory the request's own tensors hold while it waits (all that ``offload``
        moves: latents, embeddings, its scheduler's history)."""
        return held_bytes(state)

    def finish(self, state: StepState) -> list[Any]:
        """The request's images (PIL), through the VAE as the pipeline decodes them
        (SDXL's fp16 upcast and latent statistics included, and its watermark if set)."""
        pipeline = self.pipeline
        job = state.job
        decoded = decode_latents(pipeline, state.latents, width=job.width, height=job.height)
        if getattr(pipeline, "watermark", None) is not None:
            decoded = pipeline.watermark.apply_watermark(decoded)
        return list(
            pipeline.image_processor.postprocess(
                decoded, output_type="pil", do_denormalize=[True] * decoded.shape[0]
            )
        )


class StableDiffusionXLStepper(StableDiffusionStepper):
    """The SDXL loop: the SD one, with the UNet's added conditioning (pooled text
    embeddings of the second encoder and the size/crop time ids) built as
    ``StableDiffusionXLPipeline.__call__`` builds them (original and target size the
    image's, crop at 0,0) and halved with the prompt embeddings. Guidance rescale,
    denoising_end and IP-adapters (which mediagate's jobs do not set) are not here."""

    def encode(self, job: ImageJob, device: Any, guided: bool) -> tuple[Any, dict[str, Any] | None]:
        import torch

        pipeline = self.pipeline
        prompts = [job.prompt] * job.images
        negatives = [job.negative_prompt] * job.images if job.negative_prompt else None
        positive, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negatives,
        )
        encoder_2 = pipeline.text_encoder_2
        projection_dim = (
            int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        )
        size = (job.height, job.width)
        time_ids = pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=projection_dim
        ).to(device)
        if guided:
            embeds = torch.cat([negative, positive])
            text_embeds = torch.cat([negative_pooled, pooled])
        else:
            embeds, text_embeds = positive, pooled
        halves = 2 if guided else 1  # the negative's time ids equal the positive's
        added = {
            "text_embeds": text_embeds.to(device),
            "time_ids": time_ids.repeat(halves * job.images, 1),
        }
        return embeds.to(device), added
