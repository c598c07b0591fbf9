"""Generation on Ray: the SDXL generator and the actor that runs it (one pipeline per actor).

An actor (`FactoryWorker`) holds one generator and keeps its pipeline loaded while the checkpoint
stays the same; it runs one task (= one work unit) at a time, applies the quality gate (and, when
`quality.agreement` is on, scores each image against its prompt with a tower it loads once) and
returns encoded images. Which actor runs which unit is `factory.scheduler`'s business.

A task is a plain dict: {unit_id, checkpoint: {name, paths: {node: path}}, samples: [{key, prompt,
negative, seed}], sampler: {steps, cfg, scheduler, width, height, batch_size[, timestep_spacing], prediction}, image: {format,
quality}, quality: {...}}. A generator is any object with `load(path)` and
`generate(prompts, negatives, seeds, sampler) -> list[HxWx3 float array in 0..1]`. The task's sampler is
the unit's resolved settings (the campaign's, with its `sampler_overrides` for this checkpoint: steps,
cfg, scheduler, timestep_spacing) plus the checkpoint's `prediction` type.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from factory import quality as qgate
from factory.scheduler import ActorSpec
from factory.diffusion_schedulers import SCHEDULERS
from factory.shards import encode_image
from luna.settings import resolve_device

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the generator


class SDXLGenerator:
    """Text-to-image with an SDXL pipeline loaded through luna.models (one pipeline at a time)."""

    def __init__(self, device: str = "auto", dtype: str = "auto", threads: int | None = None):
        import torch

        device = resolve_device(device)
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        self.device, self.dtype = device, getattr(torch, dtype)
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.pipe = None
        self._scheduler = None
        self._latents = (None, None)

    def load(self, path: str) -> None:
        from luna.models.sampling import latent_statistics
        from luna.models.sdxl import load_sdxl

        self.pipe = None  # free the old pipeline before loading the next one
        self.adopt(load_sdxl(path, device=self.device, dtype=self.dtype), latent_statistics(path))

    def adopt(self, pipe, latents: tuple = (None, None)) -> None:
        """Use `pipe` (already loaded, e.g. by `load` or a benchmark) as this generator's pipeline;
        `latents` = an EDM file's own latent statistics (mean, std), if it declares them."""
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self._default_scheduler_config = dict(self.pipe.scheduler.config)
        vae = self.pipe.vae.config
        self._default_vae_config = {k: vae.get(k) for k in ("scaling_factor", "latents_mean", "latents_std")}
        self._latents = latents
        self._scheduler = None

    def _set_scheduler(self, name: str, prediction: str = "epsilon", timestep_spacing: str | None = None) -> None:
        """The scheduler `name` in the form the checkpoint's prediction type needs (luna.models.sampling)."""
        if (name, prediction, timestep_spacing) == self._scheduler:
            return
        import diffusers

        from luna.models.sampling import sampling_plan

        cls_name = SCHEDULERS.get(name)
        if cls_name is None:
            raise ValueError(f"sampler.scheduler={name!r} is not one of {sorted(SCHEDULERS)}")
        mean, std = self._latents
        plan = sampling_plan(self._default_scheduler_config, cls_name, prediction, timestep_spacing,
                             latents_mean=mean, latents_std=std)
        self.pipe.scheduler = getattr(diffusers, plan.scheduler_class).from_config(plan.scheduler_config)
        vae_config = plan.vae_config or self._default_vae_config  # EDM latent statistics, or the file's own
        self.pipe.vae.register_to_config(**vae_config)
        self._scheduler = (name, prediction, timestep_spacing)

    def configure(self, sampler: dict) -> None:
        """Set the pipeline's scheduler (and VAE statistics) for a task's sampler settings: the scheduler a
        campaign or its sampler_overrides rule names, the checkpoint's prediction type, timestep_spacing."""
        self._set_scheduler(str(sampler.get("scheduler", "euler")), str(sampler.get("prediction") or "epsilon"),
                            sampler.get("timestep_spacing"))

    def generate(self, prompts: list[str], negatives: list[str], seeds: list[int], sampler: dict) -> list[np.ndarray]:
        import torch

        self.configure(sampler)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(prompts),
                negative_prompt=list(negatives),
                num_inference_steps=int(sampler.get("steps", 20)),
                guidance_scale=float(sampler.get("cfg", 5.0)),
                width=int(sampler.get("width", 336)),
                height=int(sampler.get("height", 336)),
                generator=gens,
                output_type="np",
            )
        return [np.asarray(im) for im in out.images]


# --------------------------------------------------------------------------- the actor


class FactoryWorker:
    """Ray actor body: one generator, one unit at a time, quality gate, encoded images back."""

    def __init__(self, worker: str, node: str, make_generator: Callable[[], Any]):
        self.worker, self.node = worker, node
        self.generator = make_generator()
        self.loaded: str | None = None
        self.loads = 0
        self._encoders: ThreadPoolExecutor | None = None
        self._scorer: tuple[Any, qgate.AgreementScorer] | None = None  # (its config, the loaded tower)

    def ping(self) -> dict:
        return {"worker": self.worker, "node": self.node, "pid": os.getpid()}

    def run(self, task: dict) -> dict:
        t0 = time.time()
        path = task["checkpoint"]["paths"][self.node]
        load_s = 0.0
        if path != self.loaded:
            self.loaded = None
            self.generator.load(path)
            self.loaded, self.loads = path, self.loads + 1
            load_s = time.time() - t0
        sampler, img = task["sampler"], task.get("image", {})
        qcfg = qgate.QualityConfig.from_cfg(task.get("quality"))
        ext, jpeg_q = str(img.get("format", "png")), int(img.get("quality", 95))
        level = img.get("png_level")
        gate = functools.partial(_gate_and_encode, qcfg=qcfg, ext=ext, quality=jpeg_q,
                                 png_level=None if level is None else int(level))
        threads = int(img.get("encode_threads", 2))
        pool = self._pool(threads)
        scorer = self._agreement(qcfg)
        batch = max(1, int(sampler.get("batch_size", 4)))
        ahead = 2 * threads + batch  # images generated but not yet gated and encoded, at most, before the next batch
        samples = task["samples"]
        history: dict[str, list[list[str]]] = {s["key"]: [] for s in samples}
        encoded: dict[str, bytes] = {}
        seeds_used: dict[str, int] = {}
        scores: dict[str, float | None] = {}
        pending = list(samples)
        gen_s = wait_s = enc_s = agree_s = 0.0
        for attempt in range(max(1, qcfg.max_attempts)):
            if not pending:
                break
            # each image's quality gate and encoding run on the pool while the next batch generates
            jobs = []
            for i in range(0, len(pending), batch):
                if pool is not None and len(jobs) >= ahead:
                    # a generator faster than the pool waits here (GIL released) instead of running ahead: the
                    # pool threads are not kept from the GIL, and the images waiting in memory stay bounded
                    t = time.time()
                    futures.wait([jobs[len(jobs) - ahead][3]])
                    wait_s += time.time() - t
                chunk = pending[i : i + batch]
                seeds = [qgate.derive_seed(s["seed"], attempt) for s in chunk]
                t = time.time()
                outs = self.generator.generate(
                    [s["prompt"] for s in chunk], [s.get("negative", "") for s in chunk], seeds, sampler
                )
                gen_s += time.time() - t
                agree = [None] * len(chunk)
                if scorer is not None:  # batched on the tower, in line: the gate gets each image's score
                    t = time.time()
                    agree = scorer.score(outs, [s["prompt"] for s in chunk])
                    agree_s += time.time() - t
                for s, seed, im, score in zip(chunk, seeds, outs, agree):
                    jobs.append((s, seed, score, pool.submit(gate, im, score) if pool else _Done(gate(im, score))))
            t = time.time()
            failed = []
            for s, seed, score, job in jobs:  # in sample order: the result does not depend on timing
                reasons, data, seconds = job.result()
                enc_s += seconds
                history[s["key"]].append(reasons)
                if reasons:
                    failed.append(s)
                else:
                    encoded[s["key"]], seeds_used[s["key"]], scores[s["key"]] = data, seed, score
            wait_s += time.time() - t
            pending = failed
        out, rejected = [], []
        for s in samples:
            key = s["key"]
            flags = qgate.flags(history[key], scores.get(key))
            if key in encoded:
                out.append({"key": key, "image": encoded[key], "ext": ext, "seed": seeds_used[key], "quality": flags})
            else:
                rejected.append({"key": key, "reasons": flags["rejected_attempts"]})
        return {
            "unit_id": task["unit_id"], "worker": self.worker, "node": self.node, "loads": self.loads,
            "samples": out, "rejected": rejected,
            # encode_s: gate + encoding time (on the pool, mostly hidden); wait_s: what generation waited for it;
            # agreement_s: the agreement tower's forwards (in line, between batches)
            "timings": {"load_s": load_s, "generate_s": gen_s, "encode_s": enc_s, "wait_s": wait_s,
                        "agreement_s": agree_s,
                        "total_s": time.time() - t0, "start": t0, "end": time.time()},
        }

    def _agreement(self, qcfg) -> "qgate.AgreementScorer | None":
        """The agreement tower when the task turns the check on, loaded once and kept while its config stays."""
        if not (qcfg.enabled and qcfg.agreement.active):
            return None
        if self._scorer is None or self._scorer[0] != qcfg.agreement:
            self._scorer = None
            self._scorer = (qcfg.agreement, qgate.AgreementScorer(qcfg.agreement))
        return self._scorer[1]

    def _pool(self, threads: int) -> ThreadPoolExecutor | None:
        """The actor's encoding threads (0: gate and encode in line, after each image)."""
        if threads <= 0:
            return None
        if self._encoders is None or self._encoders._max_workers != threads:
            if self._encoders is not None:
                self._encoders.shutdown(wait=True)
            self._encoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="luna-encode")
        return self._encoders


class _Done:
    """A finished job, for the in-line path (the same interface as a Future)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _gate_and_encode(image: np.ndarray, score: float | None, qcfg, ext: str, quality: int, png_level: int | None):
    """(gate reasons, encoded bytes or None, seconds) of one generated image and its agreement score
    (None: not computed); PIL and zlib release the GIL, so this runs beside the generator's next batch."""
    t = time.perf_counter()
    reasons = qgate.check_image(image, qcfg) or qgate.check_agreement(score, qcfg)
    data = None if reasons else encode_image(image, ext, quality, png_level)
    return reasons, data, time.perf_counter() - t


# --------------------------------------------------------------------------- actors on the cluster


def ray_actor_factory(cluster, make_generator: Callable[[], Any], run_tag: str | None = None,
                      name_prefix: str = "luna-factory") -> Callable[[ActorSpec], Any]:
    """`make_actor(spec)` that starts a FactoryWorker pinned to spec.node with its CPU/GPU share."""
    import ray

    remote_cls = ray.remote(FactoryWorker)
    tag = run_tag or uuid.uuid4().hex[:8]

    def make(spec: ActorSpec):
        opts = dict(cluster.placement(spec.node), num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                    max_restarts=0, max_task_retries=0, name=f"{name_prefix}-{tag}-{spec.worker}")
        return remote_cls.options(**opts).remote(spec.worker, spec.node, make_generator)

    return make
