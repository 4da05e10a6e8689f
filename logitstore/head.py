"""The LM head of a causal LM as raw parts, shared by the teacher backends and the student trainer.

``Head.of(model)`` takes a transformers causal LM's output embedding (weight, bias) and the
post-head transforms its config names (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
Gemma 2's ``final_logit_softcapping``), so that code which applies the head itself, in chunks
of positions (``builders.extract`` for teachers, ``trainers.view.student_view`` for
students), computes exactly the model's logits without a ``[B, T, V]`` tensor. Calling a
``Head`` is differentiable (training); ``into`` writes into preallocated float32 buffers
(inference). This module needs torch; the rest of the store does not import it.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Head:
    """The LM head as raw parts: ``logits = post(h @ weight.T + bias)`` (post: optional scale and softcap)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None
    scale: float | None = None  # logits *= scale (Cohere's logit_scale; 1 / logits_scaling for Granite)
    softcap: float | None = None  # logits = softcap * tanh(logits / softcap) (e.g. Gemma 2)

    @classmethod
    def of(cls, model) -> Head | None:
        """The head of a transformers causal LM with the post-head transforms its config names, or None
        when the model exposes no separate LM head (then its logits cannot be computed from hidden states)."""
        lm_head = model.get_output_embeddings()
        if lm_head is None or model.base_model is model or not hasattr(lm_head, "weight"):
            return None
        cfg = model.config
        scale = getattr(cfg, "logit_scale", None)
        if getattr(cfg, "logits_scaling", None):  # Granite divides its logits
            scale = (scale or 1.0) / cfg.logits_scaling
        return cls(weight=lm_head.weight, bias=getattr(lm_head, "bias", None), scale=scale,
                   softcap=getattr(cfg, "final_logit_softcapping", None))

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[C, V]`` of ``h [C, H]`` in float32, differentiable (for training; ``into`` is the
        in-place inference path)."""
        z = torch.nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def into(self, h: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor | None) -> None:
        """Raw float32 logits of ``h [C, H]`` into ``out [C, V]`` (``tmp``: a model-dtype buffer when not fp32)."""
        w = self.weight
        if tmp is None:
            torch.matmul(h.to(w.dtype), w.t(), out=out)
        else:
            torch.matmul(h.to(w.dtype), w.t(), out=tmp)
            out.copy_(tmp)
        if self.bias is not None:
            out.add_(self.bias.float())
        if self.scale:
            out.mul_(self.scale)
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
