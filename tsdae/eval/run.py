"""Score a model on the STS suite wherever the job runs: the one dispatch that every job uses.

With ``eval.actors`` >= 1 the encoding is spread over that many Ray Data model actors
(``tsdae.eval.actors``); otherwise, inside a Ray job, one Ray task with the stage's own resources
(``eval.num_cpus`` / ``num_gpus`` / ``resources``) scores it; outside Ray, this process does.
"""

from __future__ import annotations

import ray

from tsdae.device import compute_device
from tsdae.eval.actors import evaluate_distributed
from tsdae.eval.config import EvalConfig
from tsdae.eval.encode import evaluate_model_dir
from tsdae.model import fetch_model


def evaluate_here(model_ref: str, pooling: str, cfg: EvalConfig) -> dict:
    """Fetch the model (a path, ``package:`` name or fsspec URI) into this node's model cache and score it
    in this process, on a GPU when cfg gives one and one is visible."""
    device = compute_device(cfg.num_gpus, cfg.num_cpus)
    return evaluate_model_dir(fetch_model(model_ref), pooling, cfg, device=str(device))


def evaluate_model(model_ref: str, pooling: str, cfg: EvalConfig) -> dict:
    """``evaluate_model_dir``'s result for model_ref (pooling may be "auto": read from the model's files),
    computed by actors, a Ray task or this process (see the module docstring)."""
    if cfg.actors >= 1:
        return evaluate_distributed(model_ref, pooling, cfg)
    if ray.is_initialized():
        task = ray.remote(evaluate_here).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                                        resources=cfg.resources)
        return ray.get(task.remote(model_ref, pooling, cfg))
    return evaluate_here(model_ref, pooling, cfg)
