"""Class-specific learnable prompts (CoOp; the Prompt Optimization Module of CLIP-distilled
STDC-Seg, Sec. 3.1.3, Eq. 2): ``T_i = CLIP([V_i1 ... V_iM E_i1 ... E_il])`` with a frozen text tower.

Layout as in the reference code (``docs/stdc_clip.md``, "Prompt learner"): each class name is
tokenised into ``name_length`` slots ``[SOT] name [EOT] 0...``; the M context vectors go right
after [SOT], so the sequence is ``[SOT] V_1..V_M name [EOT] 0...`` of length ``M + name_length``
(16 for M = 11, name_length = 5) and the EOT token sits at ``argmax(name ids) + M``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.frozen import keep_in_eval
from segprompt.models.text.clip_text import CLIPTextEncoder


class PromptLearner(nn.Module):
    """``forward() -> Tensor[K, embed_dim]``: one embedding per class from its context vectors
    ``ctx`` (K x M x width, i.i.d. N(0, init_std^2), the only trainable tensor) and its name.

    The encoder is frozen: no gradients, always in eval mode (:func:`~segprompt.models.frozen.keep_in_eval` also tells the
    segmentor). Gradients reach ``ctx`` through it.
    """

    def __init__(self, encoder: CLIPTextEncoder, class_names: Sequence[str], n_ctx: int = 11,
                 name_length: int = 5, init_std: float = 0.02):
        super().__init__()
        names = list(class_names)
        if n_ctx < 0:
            raise SegpromptError(f"n_ctx must be >= 0 (number of learnable context vectors), got {n_ctx}")
        if name_length < 3 or n_ctx + name_length > encoder.context_length:
            raise SegpromptError(f"n_ctx + name_length = {n_ctx} + {name_length} must fit CLIP's "
                                 f"{encoder.context_length} positions, and name_length must be >= 3 "
                                 f"([SOT] name [EOT])")
        tokenizer = encoder.tokenizer
        for name in names:
            n = len(tokenizer.encode(name))
            if n == 0 or n + 2 > name_length:
                raise SegpromptError(
                    f"class name {name!r} is {n} BPE tokens; with [SOT] and [EOT] it needs {n + 2} slots but "
                    f"name_length is {name_length}. Raise name_length (the prompt grows with it) or rename the class")
        self.n_ctx = n_ctx
        self.name_length = name_length
        self.register_buffer("name_tokens", encoder.tokenize(names, name_length), persistent=False)
        self.ctx = nn.Parameter(torch.empty(len(names), n_ctx, encoder.width))
        nn.init.normal_(self.ctx, std=init_std)
        self.encoder = encoder
        encoder.requires_grad_(False)
        keep_in_eval(encoder)
        encoder.eval()

    @property
    def context_length(self) -> int:
        return self.n_ctx + self.name_length

    def train(self, mode: bool = True) -> PromptLearner:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self) -> torch.Tensor:
        emb = self.encoder.token_embedding(self.name_tokens)  # [K, name_length, width]
        x = torch.cat([emb[:, :1], self.ctx.to(emb.dtype), emb[:, 1:]], dim=1)
        eot = self.name_tokens.argmax(dim=-1) + self.n_ctx
        return self.encoder.encode_embeddings(x, eot)
