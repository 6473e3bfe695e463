"""The Wan text-to-video denoising loop, one step at a time, for many jobs at once.

The counterpart of ``stable_diffusion.py`` for ``WanPipeline`` (Wan 2.1, and Wan 2.2's
single-transformer TI2V with ``expand_timesteps``), mirroring its call (diffusers
0.42): the prompt encoded with the call's ``max_sequence_length`` of 512 (not
``encode_prompt``'s default of 226), float32 latents from the job's seed, a
flow-matching scheduler copy per job, and per step one transformer pass for every job
given, conditional and unconditional halves folded into the batch (the pipeline runs
them as two passes: the same numbers to float rounding). Two-transformer models
(Wan 2.2 A14B: ``boundary_ratio``) are not stepped here.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from mediagate.protocol.work import VideoGeneration
from models.stepping.placement import held_bytes, move_state

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default


@dataclass(eq=False)
class VideoStepState:
    """One video job in the loop."""

    generation: VideoGeneration
    scheduler: Any
    timesteps: Any
    latents: Any  # (1, C, frames, h, w), float32
    prompt_embeds: Any  # (1, L, D)
    negative_embeds: Any | None  # with guidance
    step_index: int = 0

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None

    @property
    def batch_key(self) -> Hashable:
        return (tuple(self.latents.shape[1:]), self.guided)


class WanStepper:
    """Runs the loop of a loaded ``WanPipeline`` step by step."""

    def __init__(self, pipeline: Any) -> None:
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError("two-transformer Wan models are not stepped here")
        self.pipeline = pipeline
        # each job's scheduler is copied from this one, taken before any call: a pipeline
        # call running beside the loop (image-to-video) changes the pipeline's own
        self.scheduler = copy.deepcopy(pipeline.scheduler)

    def start(self, generation: VideoGeneration) -> VideoStepState:
        import torch

        pipeline = self.pipeline
        device = pipeline._execution_device
        guided = generation.guidance_scale > 1.0
        with torch.no_grad():
            positive, negative = pipeline.encode_prompt(
                prompt=generation.prompt,
                negative_prompt=generation.negative_prompt,
                do_classifier_free_guidance=guided,
                num_videos_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                device=device,
            )
        dtype = pipeline.transformer.dtype
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(generation.num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        generator = torch.Generator(device="cpu").manual_seed(generation.seed)
        latents = pipeline.prepare_latents(
            1,
            pipeline.transformer.config.in_channels,
            generation.height,
            generation.width,
            generation.num_frames,
            torch.float32,
            device,
            generator,
        )
        return VideoStepState(
            generation=generation,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            latents=latents,
            prompt_embeds=positive.to(dtype),
            negative_embeds=negative.to(dtype) if guided else None,
        )

    def _timestep(self, state: VideoStepState, t: Any) -> Any:
        if self.pipeline.config.expand_timesteps:  # per token (Wan 2.2 TI2V)
            mask = state.latents.new_ones(state.latents.shape)
            return (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)
        return t.reshape(1)

    def step(self, states: Sequence[VideoStepState]) -> None:
        """One step of every state (equal ``batch_key``) in one transformer pass."""
        import torch

        if not states:
            return
        if len({state.batch_key for state in states}) != 1:
            raise ValueError("states in one forward pass must share their shape and guidance")
        transformer = self.pipeline.transformer
        inputs, timesteps, embeds = [], [], []
        for state in states:
            t = state.timesteps[state.step_index]
            halves = 2 if state.guided else 1
            latents = state.latents.to(transformer.dtype)
            inputs += [latents] * halves
            timesteps += [self._timestep(state, t)] * halves
            embeds.append(state.prompt_embeds)
            if state.guided:
                embeds.append(state.negative_embeds)
        with torch.no_grad():
            predicted = transformer(
                hidden_states=torch.cat(inputs),
                timestep=torch.cat(timesteps),
                encoder_hidden_states=torch.cat(embeds),
                return_dict=False,
            )[0]
        offset = 0
        for state in states:
            noise = predicted[offset : offset + 1]
            if state.guided:
                unconditional = predicted[offset + 1 : offset + 2]
                scale = state.generation.guidance_scale
                noise = unconditional + scale * (noise - unconditional)
            offset += 2 if state.guided else 1
            t = state.timesteps[state.step_index]
            state.latents = state.scheduler.step(noise, t, state.latents, return_dict=False)[0]
            state.step_index += 1

    def offload(self, state: VideoStepState) -> None:
        move_state(state, "cpu")

    def reload(self, state: VideoStepState) -> None:
        move_state(state, self.pipeline._execution_device)

    def held_bytes(self, state: VideoStepState) -> int:
        """Memory the request's own tensors hold while it waits (all that ``offload``
        moves: latents, embeddings, its scheduler's history)."""
        return held_bytes(state)

    def finish(self, state: VideoStepState) -> Any:
        """The frames, (frames, H, W, 3) floats in [0, 1], as the pipeline's ``np`` output."""
        import torch

        vae = self.pipeline.vae
        latents = state.latents.to(dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
        with torch.no_grad():
            video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.pipeline.video_processor.postprocess_video(video, output_type="np")[0]
