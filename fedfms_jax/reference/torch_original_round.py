"""One federated round trained the way the original FedFMS PyTorch code trains.

What the original does (train_fed_sam*.py), reproduced here for speed comparisons:
- every site keeps its own full model and its own Adam (lr 1e-4, betas 0.9/0.999) for the
  whole run; the optimizer is built over all parameters and skips frozen ones;
- FedMSA freezes every image-encoder parameter whose name lacks "Adapter"; the prompt
  encoder and mask decoder stay trainable. FedSAM trains everything;
- sites train one after another, eager fp32, loss BCEWithLogitsLoss(pos_weight=2) on the
  low-resolution logits, zero_grad / backward / step per batch;
- aggregation walks the parameters one by one: a zero tensor accumulates
  weight_i * param_i over the sites, then is copied into every site's model (frozen
  parameters included, so they stay identical).

`persistent=False` is the lighter variant: each round every site starts from a deep copy
of the global model with a fresh Adam, and the weighted sum goes into the global model.
The compute per step is the same; only memory and the copy cost differ.
"""
from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
from torch import nn

_ENCODER_PREFIX = "image_encoder."


def is_trainable(name: str, method: str) -> bool:
    """The original's freezing rule for a parameter named as in the state dict."""
    if method == "fedsam":
        return True
    if method == "fedmsa":
        return not name.startswith(_ENCODER_PREFIX) or "Adapter" in name
    raise ValueError(f"unknown method {method!r}")


def set_trainable(model: nn.Module, method: str) -> int:
    """Set requires_grad per the method; returns the number of trainable elements."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, method))
        count += param.numel() if param.requires_grad else 0
    return count


def _adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # As the original: over all parameters; those without a gradient are skipped by step().
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


class OriginalStyleFederation:
    """Sites trained one after another, then parameter-by-parameter weighted averaging."""

    def __init__(self, global_model: nn.Module, *, method: str, weights: Sequence[float],
                 lr: float = 1e-4, pos_weight: float = 2.0, persistent: bool = True):
        self.method = method
        self.lr = lr
        self.weights = [float(w) for w in weights]
        self.persistent = persistent
        device = next(global_model.parameters()).device
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.ones([1], device=device) * pos_weight)
        self.trainable_elements = set_trainable(global_model, method)
        self.global_model = global_model
        if persistent:
            self.models = [copy.deepcopy(global_model) for _ in self.weights]
            self.optimizers = [_adam(m, lr) for m in self.models]
        self.timings: dict[str, float] = {}

    @property
    def num_clients(self) -> int:
        return len(self.weights)

    def _client(self, c: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.persistent:
            return self.models[c], self.optimizers[c]
        model = copy.deepcopy(self.global_model)
        return model, _adam(model, self.lr)

    def local_train(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
        model.train()
        loss = torch.zeros(())
        for x, y in zip(images, labels):
            logits = model(x)
            loss = self.loss_fn(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def aggregate(self, models: Sequence[nn.Module]) -> None:
        """Weighted average, one parameter at a time, as the original's update_global_model.

        Persistent: the average is written back into every site's model. Otherwise it
        becomes the global model's parameter.
        """
        global_params = [] if self.persistent else list(self.global_model.parameters())
        for i, params in enumerate(zip(*(m.parameters() for m in models))):
            new = torch.zeros_like(params[0])
            for w, p in zip(self.weights, params):
                new.add_(p.data, alpha=w)
            if self.persistent:
                for p in params:
                    p.data.mul_(0).add_(new)
            else:
                global_params[i].data.copy_(new)

    def run_round(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """images [steps, clients, B, 3, H, W] float, labels [steps, clients, B, C, h, w].

        Clients with weight 0 (the unseen site) are not trained, as in the original.
        Returns the mean last-step loss; per-part seconds land in `self.timings`.
        """
        synchronize = _synchronizer(images)
        t0 = time.perf_counter()
        models, losses = [], []
        for c in range(self.num_clients):
            if self.weights[c] == 0 and not self.persistent:
                models.append(self.global_model)  # weight 0: neither copied nor trained
                continue
            model, optimizer = self._client(c)
            models.append(model)
            if self.weights[c] > 0:
                losses.append(self.local_train(model, optimizer, images[:, c], labels[:, c]))
        synchronize()
        t1 = time.perf_counter()
        self.aggregate(models)
        synchronize()
        t2 = time.perf_counter()
        self.timings = {"local_s": t1 - t0, "aggregate_s": t2 - t1}
        return sum(losses) / max(len(losses), 1)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        model = self.models[0] if self.persistent else self.global_model
        model.eval()
        out = model(images)
        _synchronizer(images)()
        return out


def _synchronizer(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.synchronize
    return lambda: None
