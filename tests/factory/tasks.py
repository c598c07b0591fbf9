"""Work-unit tasks (the dict the scheduler sends to actors) for the worker and scheduler tests."""
from __future__ import annotations

SAMPLER = {"steps": 2, "cfg": 5.0, "scheduler": "euler", "width": 16, "height": 16, "batch_size": 2}


def make_tasks(checkpoints: dict[str, list[str]], units_per_ckpt: int, per_unit: int = 2) -> list[dict]:
    tasks = []
    for c, nodes in checkpoints.items():
        for u in range(units_per_ckpt):
            tasks.append({
                "unit_id": f"{c}-u{u}",
                "checkpoint": {"name": c, "paths": {n: f"/models/{n}/{c}.safetensors" for n in nodes}},
                "samples": [{"key": f"{c}_{u}_{i}", "prompt": f"p{i}", "negative": "", "seed": 100 * u + i}
                            for i in range(per_unit)],
                "sampler": SAMPLER, "image": {"format": "png"}, "quality": {"max_attempts": 3},
            })
    return tasks
