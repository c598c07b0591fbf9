"""Every GPU benchmark in one script, at real size with random weights, printing ratios.

    python benchmarks/gpu_all.py               # real sizes on the GPU (7.5 minutes on one H200, 2026-11-28)
    python benchmarks/gpu_all.py --tiny        # the same sections at tiny sizes on CPU (a couple of minutes)
    python benchmarks/gpu_all.py --only factory projector --out benchmarks/results/gpu_all.md

Sections (each measures its baseline in the same run and prints `RATIO` lines; a section that
fails prints its error and the others still run):
  factory     SDXL (real architecture from luna/models/configs, random weights) in the factory's
              actor body (`factory.worker.FactoryWorker.run`: generation, quality gate, image
              encoding) vs a bare diffusers loop on the same pipeline, at 336² and 1024²
  extraction  `benchmarks/extract_bench.py --arch ViT-H-14`: end-to-end extraction vs the bare
              ViT-H-14 forward
  runtime     `benchmarks/runtime_bench.py --preset sdxl-random`: N crops batched vs one by one at 1024²
  projector   one training step of the full-size learned-query decoder (1024 -> 77x2048, batch 256,
              AdamW, bf16 autocast on GPU) vs the chunk-shuffled loader reading full-size pairs
              from disk (loader samples/s / step samples/s > 1: the GPU is fed); online targets
              (`data.conditionings=online`): the full-size SDXL text encoders (CLIP-L + bigG, random
              weights, fp16) on the device, per new prompt, vs the step and vs the stored loader, and
              both tokenizers on one CPU core (once per prompt: the ids are stored with the pairs)
  toy         `luna make-toy`'s five stages for a few hundred steps on the device vs a few dozen on the
              CPU: ms a step, speed-up, the default run's time projected
  faiss       faiss-gpu single-query and batched latency (Flat and IVF) at 500k x 1024 vs the
              vault's CPU HNSW32 default on one thread (faiss-cpu when no GPU build is installed)
Random weights: the ratios, not the images, are what is measured. Figures go into BENCHMARKS.md
with the card's name (printed first).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RATIOS: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)


def ratio(name: str, value: float, target: str = "") -> None:
    line = f"RATIO {name} = {value:.3f}" + (f"  ({target})" if target else "")
    RATIOS.append(line)
    say(line)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {platform.machine()} x {os.cpu_count()}, torch {torch.__version__}"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- factory
def random_sdxl(device: str, dtype):
    """StableDiffusionXLPipeline of the real SDXL architecture with random weights (no download)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from luna.models.configs import SDXL_BASE
    from luna.models.tokenizers import sdxl_tokenizers

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE / "unet")).to(dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE / "vae")).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE / "text_encoder")).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE / "text_encoder_2")).to(dtype)
    with torch.no_grad():  # random weights: keep activations in range so fp16 stays finite
        for p in unet.parameters():
            p.mul_(0.5)
    tok, tok2 = sdxl_tokenizers()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(SDXL_BASE, subfolder="scheduler"),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class InMemoryGenerator:
    """The factory's SDXLGenerator around a pipeline already in memory (`load` keeps it)."""

    def __init__(self, pipe, device: str):
        from factory.worker import SDXLGenerator

        self.inner = SDXLGenerator(device=device, dtype="float16" if device.startswith("cuda") else "float32")
        self.inner.adopt(pipe)

    def load(self, path: str) -> None:
        pass

    def generate(self, *args):
        return self.inner.generate(*args)


def bare_loop(pipe, prompts, seeds, sampler, device: str) -> float:
    """images/s of `pipe(...)` batch after batch, images kept as numpy (what a script keeps)."""
    import torch

    bs = sampler["batch_size"]
    sync(device)
    t, n = time.perf_counter(), 0
    for i in range(0, len(prompts), bs):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + bs]]
        with torch.inference_mode():
            out = pipe(prompt=prompts[i : i + bs], negative_prompt=[""] * len(prompts[i : i + bs]),
                       num_inference_steps=sampler["steps"], guidance_scale=sampler["cfg"], width=sampler["width"],
                       height=sampler["height"], generator=gens, output_type="np").images
        n += len(out)
    sync(device)
    return n / (time.perf_counter() - t)


def section_factory(args) -> None:
    import torch

    from factory.worker import FactoryWorker

    if args.tiny:
        from luna.models.tiny import tiny_pipeline

        torch.set_num_threads(1)  # two shared cores: more threads only contend
        pipe = tiny_pipeline(0)
        sizes, steps, batch, n = [(64, 2), (96, 2)], 1, 2, 4
    else:
        t = time.perf_counter()
        pipe = random_sdxl(args.device, torch.float16)
        say(f"random SDXL built on {args.device} in {time.perf_counter() - t:.1f} s")
        sizes, steps, batch, n = [(336, 8), (1024, 4)], 8, None, None  # bs x 4 images per size
    gen = InMemoryGenerator(pipe, args.device)
    for size, bs in sizes:
        count = n or bs * 4
        sampler = {"steps": steps, "cfg": 5.0, "scheduler": "euler", "width": size, "height": size, "batch_size": bs}
        prompts = [f"closeup of eyes, variant {i}" for i in range(count)]
        seeds = list(range(count))
        bare_loop(pipe, prompts[:bs], seeds[:bs], sampler, args.device)  # warm-up: kernels, allocator
        base = bare_loop(pipe, prompts, seeds, sampler, args.device)
        worker = FactoryWorker("w0", "bench", lambda: gen)
        task = {"unit_id": "bench", "checkpoint": {"name": "random", "paths": {"bench": "memory"}},
                "samples": [{"key": f"k{i}", "prompt": p, "negative": "", "seed": s}
                            for i, (p, s) in enumerate(zip(prompts, seeds))],
                "sampler": sampler, "image": {"format": "png"}, "quality": {"max_attempts": 1}}
        worker.run(dict(task, samples=task["samples"][:bs]))  # warm-up: the encoding threads, PIL's encoder
        sync(args.device)
        t = time.perf_counter()
        res = worker.run(task)
        sync(args.device)
        fact = (len(res["samples"]) + len(res["rejected"])) / (time.perf_counter() - t)
        say(f"factory {size}²: bare {base:.2f} img/s, factory actor {fact:.2f} img/s "
            f"(generate {res['timings']['generate_s']:.2f} s, encode {res['timings']['encode_s']:.2f} s, batch {bs}, {steps} steps)")
        ratio(f"factory/bare at {size}²", fact / base, "target >= 0.9")
    del pipe, gen
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- delegated scripts
def run_script(argv: list[str], timeout: float) -> None:
    say(f"$ python {' '.join(argv)}")
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout + ("\n" + proc.stderr[-2000:] if proc.returncode else "")).strip()
    for line in out.splitlines()[-25:]:
        say("  " + line)
        if line.startswith("RATIO") or "x |" in line:
            RATIOS.append(line.strip())
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")


def section_extraction(args) -> None:
    if args.tiny:
        run_script(["benchmarks/extract_bench.py", "--images", "32", "--shards", "2", "--batch-size", "16",
                    "--workers", "1", "--device", "cpu"], args.timeout)
    else:
        run_script(["benchmarks/extract_bench.py", "--arch", "ViT-H-14", "--images", "4096", "--shards", "16",
                    "--batch-size", "128", "--workers", "auto", "--device", args.device], args.timeout)


def section_runtime(args) -> None:
    if args.tiny:
        run_script(["benchmarks/runtime_bench.py", "--skip-4k", "--repeats", "1", "--crops", "2", "--steps", "1",
                    "--canvas", "512", "--device", "cpu"], args.timeout)
    else:
        run_script(["benchmarks/runtime_bench.py", "--preset", "sdxl-random", "--skip-4k", "--repeats", "1",
                    "--crops", "8", "--working", "1024", "--device", args.device], args.timeout)


# --------------------------------------------------------------------------- projector
def section_projector(args) -> None:
    import torch

    from extraction.synthetic import write_synthetic_pairs
    from projector import models
    from projector.data import PairsDataModule

    if args.tiny:
        torch.set_num_threads(1)  # two shared cores: more threads only contend
    dims = ({"in_dim": 32, "cond_dim": 48, "pooled_dim": 16, "seq_len": 77} if args.tiny
            else {"in_dim": 1024, "cond_dim": 2048, "pooled_dim": 1280, "seq_len": 77})
    spec = ({"_target_": "projector.models.LearnedQueryDecoder", "width": 64, "depth": 2, "heads": 4} if args.tiny
            else {"_target_": "projector.models.LearnedQueryDecoder", "width": 512, "depth": 4, "heads": 8})
    batch = 32 if args.tiny else 256
    net = models.build(spec, **dims).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, dims["in_dim"], device=args.device)
    y = torch.randn(batch, 77, dims["cond_dim"], device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()

    def step():
        with amp:
            out = net(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.mse_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(args.device)
    steps = 5 if args.tiny else 30
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(args.device)
    step_rate = steps * batch / (time.perf_counter() - t)
    say(f"projector step: {models.count_parameters(net):,} parameters, batch {batch}: {step_rate:,.0f} samples/s")
    with tempfile.TemporaryDirectory() as tmp:
        n = 512 if args.tiny else 4096
        text_dims = (16, 32) if args.tiny else (768, 1280)
        folder = write_synthetic_pairs(Path(tmp) / "pairs", n, n, dims["in_dim"], text_dims=text_dims,
                                       pooled_dim=dims["pooled_dim"], n_clusters=16, parts=4, prompt_order="blocks")
        for f in folder.glob("*.h5"):  # read from disk, not the page cache the writer left
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        dm = PairsDataModule(str(folder), batch_size=batch, val_prompts=0.05, val_checkpoints=0, in_memory=False,
                             num_workers=0 if args.tiny else 8, stats_prompts=64, knn_max_queries=8)
        dm.setup()
        t, seen = time.perf_counter(), 0
        for b in dm.train_dataloader():
            seen += len(b["x"])
        load_rate = seen / (time.perf_counter() - t)
        dm.teardown()
    say(f"projector loader from disk ({n} images, one prompt each, conditioning 77x{sum(text_dims)}): "
        f"{load_rate:,.0f} samples/s")
    ratio("projector loader/step", load_rate / step_rate, "target > 1: the loader feeds the GPU")
    del net, opt, x, y
    online_targets(args, batch, step_rate, load_rate)


def text_encoders(args):
    """SDXL's tokenizers and text encoders: CLIP-L + OpenCLIP bigG at real size with random weights
    (fp16 on the GPU), or the tiny preset's (fp32, CPU) with --tiny."""
    import json

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from luna.models.configs import SDXL_BASE
    from luna.models.sdxl import TextEncoders
    from luna.models.tokenizers import sdxl_tokenizers

    if args.tiny:
        from luna.models.tiny import tiny_pipeline

        return TextEncoders.from_pipeline(tiny_pipeline(0))
    cfg = lambda sub: CLIPTextConfig(**json.loads((SDXL_BASE / sub / "config.json").read_text()))  # noqa: E731
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        te1 = CLIPTextModel(cfg("text_encoder")).to(dtype).eval()
        te2 = CLIPTextModelWithProjection(cfg("text_encoder_2")).to(dtype).eval()
    return TextEncoders(*sdxl_tokenizers(), te1, te2)


def online_targets(args, batch: int, step_rate: float, load_rate: float) -> None:
    """`data.conditionings=online` on this device: prompts/s of the text encoders on the token ids
    (`encode_ids`, what `OnlineTargets` runs once a batch is on the device), every prompt new (one image
    per prompt: no cache hits), against the training step; and of both tokenizers on one CPU core (each
    prompt once, at the first setup on a pairs folder: the loader gathers stored ids)."""
    import torch

    from luna.models.sdxl import encode_ids, tokenize

    enc = text_encoders(args)
    words = "blue eyes close-up gold ring hand silk dress red green freckles hair silver necklace denim jacket".split()
    n_batches = 4 if args.tiny else 8
    prompts = [f"{i} " + " ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 15))
               for i in range((n_batches + 1) * batch)]
    toks = (enc.tokenizer, enc.tokenizer_2)
    ids = [tokenize(toks, prompts[:batch])]  # warm-up: the tokenizers' caches of these words
    t = time.perf_counter()
    ids += [tokenize(toks, prompts[i : i + batch]) for i in range(batch, len(prompts), batch)]
    tok_rate = (len(prompts) - batch) / (time.perf_counter() - t)
    with torch.inference_mode():
        encode_ids(enc, *ids[0])  # warm-up: kernels, allocator
        sync(args.device)
        t = time.perf_counter()
        for pair in ids[1:]:
            cond, pooled = encode_ids(enc, *(i.to(args.device, non_blocking=True) for i in pair))
        sync(args.device)
        enc_rate = (len(prompts) - batch) / (time.perf_counter() - t)
    online_rate = 1 / (1 / enc_rate + 1 / step_rate)  # encoders then the step, one after the other on the device
    say(f"projector online targets (conditioning {tuple(cond.shape[1:])} + {tuple(pooled.shape[1:])}, batch {batch}, "
        f"new prompts): tokenizers {tok_rate:,.0f} prompts/s on one CPU core (once per prompt, stored with the "
        "pairs), "
        f"text encoders on the device "
        f"{enc_rate:,.0f} prompts/s; a training step with online targets {online_rate:,.0f} samples/s "
        f"(step alone {step_rate:,.0f})")
    ratio("projector online encoders/step", enc_rate / step_rate, "> 1: encoding a batch's prompts costs less than its step")
    stored_rate = min(step_rate, load_rate)  # stored conditionings: the step, or the loader when it is slower
    ratio("projector online / stored training samples/s", online_rate / stored_rate,
          f"> 1: online targets train faster than stored ones read from disk ({stored_rate:,.0f} samples/s)")


# --------------------------------------------------------------------------- faiss
def section_faiss(args) -> None:
    import faiss

    n, d = (20_000, 64) if args.tiny else (500_000, 1024)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, d), dtype=np.float32)
    x = centres[rng.integers(0, 256, n)] + rng.standard_normal((n, d), dtype=np.float32) * 0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, 200, replace=False)] + rng.standard_normal((200, d), dtype=np.float32) * 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    def p50(index, queries) -> float:
        index.search(queries[:1], 10)
        out = []
        for i in range(len(queries)):
            t = time.perf_counter()
            index.search(queries[i : i + 1], 10)
            out.append(time.perf_counter() - t)
        return float(np.median(out) * 1000)

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not gpus and not args.tiny:  # the CPU side alone at this size is vault_bench's business (minutes of HNSW build)
        say(f"faiss {getattr(faiss, '__version__', '?')}: no GPU build of faiss (faiss-gpu) here: GPU latency not "
            "measured")
        return
    from vault.index import build_tuned

    threads = faiss.omp_get_max_threads()
    t = time.perf_counter()
    hnsw, tuning = build_tuned(x, "HNSW32", target=0.97, budget_ms=None, n_queries=500)
    say(f"faiss: CPU HNSW32 built in {time.perf_counter() - t:.1f} s, {tuning.describe()}")
    faiss.omp_set_num_threads(1)
    cpu_ms = p50(hnsw, q)
    faiss.omp_set_num_threads(threads)
    say(f"faiss: CPU HNSW32 ({tuning.params}) one thread: p50 {cpu_ms:.3f} ms")
    if not gpus:
        say("faiss: no GPU build of faiss (faiss-gpu) or no GPU: GPU latency not measured")
        return
    res = faiss.StandardGpuResources()
    flat = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(d))
    flat.add(x)
    flat_ms = p50(flat, q)
    t = time.perf_counter()
    flat.search(q, 10)
    batch_ms = (time.perf_counter() - t) * 1000
    say(f"faiss-gpu Flat: single-query p50 {flat_ms:.3f} ms, 200 queries in one call {batch_ms:.2f} ms")
    ratio("faiss-gpu Flat p50 / CPU HNSW p50", flat_ms / cpu_ms, "< 1: the GPU answers a single query faster")


# --------------------------------------------------------------------------- toy-world training
def _toy_stages(args, steps, batch_scale, pool, defaults, per_step, calls) -> None:
    """Each stage on the device, then on the CPU: seconds a step from the step calls' start times after
    the first quarter (warm-up: first kernels, allocator), so the setup (models, latent pool) and the
    end (the final save, the VAE's latent rescaling) are out."""
    from luna.models.toy import train

    for where, device in (("device", args.device), ("cpu", "cpu")):
        if where == "device" and args.device == "cpu":
            continue
        stages = {k: train.StageConfig(steps=steps[where][k], batch=max(2, int(defaults[k].batch * batch_scale)),
                                       lr=float(defaults[k].lr)) for k in train.STAGES}
        per_step[where] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("vae", "decoder", "base", "pony", "vision"):  # each after what it needs
                calls.clear()
                sync(device)
                with contextlib.redirect_stderr(io.StringIO()):  # the stages' tqdm bars
                    train.make_toy(tmp, Path(tmp) / "out", seed=2026, stages=stages, checkpoint_every_s=1e9,
                                   only=[name], pool_size=pool, device=device, render_workers="auto")
                # step starts only: after the last one come the stage's final save and (vae) the latent
                # rescaling, which are not steps
                first = len(calls) // 4
                per_step[where][name] = (calls[-1] - calls[first]) / (len(calls) - 1 - first)
        say(f"toy make-toy on {where} ({device}, batches {[stages[k].batch for k in train.STAGES]}): " + ", ".join(
            f"{k} {v * 1000:.1f} ms/step ({steps[where][k]} steps)" for k, v in per_step[where].items()))


def section_toy(args) -> None:
    """`luna make-toy`'s stages (luna.models.toy.train, batches rendered on the CPU as always) for a
    few hundred steps on the device against a few dozen on this machine's CPU, same run: seconds a
    step per stage (after a warm-up; the setup, e.g. the latent pool, left out), the speed-up, and the
    whole default run (conf/make_toy.yaml's steps) projected from them."""
    import torch
    from omegaconf import OmegaConf

    from luna.models.toy import train

    defaults = OmegaConf.load(ROOT / "conf" / "make_toy.yaml").stages
    full = {k: int(defaults[k].steps) for k in train.STAGES}
    if args.tiny:
        torch.set_num_threads(1)
        steps = {"device": {k: 4 for k in train.STAGES}, "cpu": {k: 4 for k in train.STAGES}}
        batch_scale, pool = 0.25, 32
    else:
        steps = {"device": {"vae": 300, "decoder": 300, "base": 400, "pony": 200, "vision": 300},
                 "cpu": {"vae": 20, "decoder": 20, "base": 20, "pony": 10, "vision": 20}}
        batch_scale, pool = 1.0, 4096
    calls: list[float] = []  # when each step began (its step_fn call): the stage's own loop, timed from outside
    run = train.Stage.run

    def timed_run(self, step_fn, *a, **kw):
        def step(i):
            calls.append(time.perf_counter())
            return step_fn(i)
        return run(self, step, *a, **kw)

    train.Stage.run = timed_run
    per_step: dict[str, dict[str, float]] = {}
    try:
        _toy_stages(args, steps, batch_scale, pool, defaults, per_step, calls)
    finally:
        train.Stage.run = run
    cpu = per_step["cpu"]
    serial_cpu = sum(full[k] * cpu[k] for k in full)
    say(f"toy make-toy, default steps {full}, one process after another: CPU (torch threads "
        f"{torch.get_num_threads()}) {serial_cpu / 60:.1f} min projected")
    if "device" in per_step:
        dev = per_step["device"]
        serial_dev = sum(full[k] * dev[k] for k in full)
        say(f"toy make-toy on the device: {serial_dev / 60:.1f} min projected, one stage after another")
        for k in full:
            ratio(f"toy {k} step device/CPU speed-up", cpu[k] / dev[k])
        ratio("toy make-toy whole run CPU/device", serial_cpu / serial_dev, "> 1: the device trains the toy world faster")


SECTIONS = {"factory": section_factory, "extraction": section_extraction, "runtime": section_runtime,
            "projector": section_projector, "toy": section_toy, "faiss": section_faiss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (tests this script without a GPU)")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--out", type=Path, default=None, help="also write everything printed to this file")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for each delegated script (extraction, runtime)")
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and not args.device.startswith("cuda"):
        say("gpu_all: no CUDA device; real sizes on CPU would take hours. Use --tiny to check the script.")
        return 2
    buf = io.StringIO()
    start = time.perf_counter()
    failed = []
    with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
        say(f"gpu_all: {'tiny sizes' if args.tiny else 'real sizes, random weights'} on {device_name(args.device)}")
        for name in args.only:
            say(f"\n== {name}")
            t = time.perf_counter()
            try:
                SECTIONS[name](args)
            except Exception as e:  # noqa: BLE001 - report it and go on with the other sections
                failed.append(name)
                say(f"{name} FAILED: {type(e).__name__}: {e}")
                say("".join(traceback.format_exc().splitlines(keepends=True)[-6:]))
            say(f"({name}: {time.perf_counter() - t:.1f} s)")
        say(f"\n== summary ({time.perf_counter() - start:.0f} s{', failed: ' + ', '.join(failed) if failed else ''})")
        for line in RATIOS:
            say(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(buf.getvalue())
    return 1 if failed else 0


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


if __name__ == "__main__":
    sys.exit(main())
