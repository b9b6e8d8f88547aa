"""CLIP's text tower alone (Radford et al.; the "CLIP text encoder" of CLIP-distilled STDC-Seg,
Sec. 3.1.2-3.1.3 and Algorithm 1), built by open_clip from its model config, with no visual tower.

Two entry points:

- :meth:`CLIPTextEncoder.encode_names`: bare class names -> embeddings, exactly open_clip's
  ``CLIP.encode_text`` (77 tokens, causal mask, ln_final, pooling at the EOT token = the argmax of
  the token ids, ``text_projection``). Stage 1 of the paper uses these as fixed text embeddings.
- :meth:`CLIPTextEncoder.encode_embeddings`: token embeddings already formed (learnable context
  vectors spliced in, Eq. 2) -> embeddings, with the positional embedding and causal mask cut to
  the sequence length (``docs/stdc_clip.md``, "Prompt learner").

Weights come from a local file only: OpenAI's TorchScript ``RN50.pt`` or an open_clip state dict.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.text import DEFAULT_WEIGHTS
from segprompt.models.weights import load_strict, torch_file, unwrap_state_dict

_PLAIN_TEXT_CFG = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


@functools.cache
def clip_tokenizer(arch: str):
    """open_clip's BPE tokenizer for ``arch`` (built once: it parses the packaged vocabulary)."""
    return open_clip.get_tokenizer(arch)


def text_config(arch: str) -> tuple[int, dict]:
    """``(embed_dim, text_cfg)`` of an open_clip model config with CLIP's own text transformer."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SegpromptError(f"unknown CLIP architecture '{arch}'; use an open_clip model name such as 'RN50' "
                             f"(open_clip.list_models() lists them)")
    text_cfg = cfg["text_cfg"]
    if not text_cfg.keys() <= _PLAIN_TEXT_CFG:  # HF towers, CoCa's CLS token, no causal mask, custom blocks...
        raise SegpromptError(f"CLIP architecture '{arch}' has no plain CLIP text transformer "
                             f"(causal, EOT-pooled, linear projection); use 'RN50'")
    return cfg["embed_dim"], text_cfg


def _is_text_key(key: str) -> bool:
    return key == "positional_embedding" or key.startswith(
        ("token_embedding.", "transformer.", "ln_final.", "text_projection"))


def missing_weights_error(path: str | Path, arch: str = "RN50") -> SegpromptError:
    """The error for an absent CLIP file: which file, where it is published, what to do."""
    url = open_clip.pretrained.get_pretrained_url(arch, "openai")
    where = f"OpenAI publishes it at {url}" if url else "an open_clip state dict of it works"
    return SegpromptError(
        f"CLIP weights '{path}' (clip_weights) do not exist. Put the {arch} CLIP checkpoint there ({where}; "
        f"default location {DEFAULT_WEIGHTS}), or set clip_weights to its path (nothing is downloaded)")


def read_clip_state_dict(path: str | Path, arch: str = "RN50") -> dict[str, torch.Tensor]:
    """Every tensor of a local CLIP checkpoint under OpenAI's key names (``token_embedding.weight``,
    ``transformer.resblocks.0.attn.in_proj_weight``, ..., ``visual.*``).

    Reads OpenAI's TorchScript archive (``torch.jit.load``, as OpenAI publishes only that) and
    falls back to ``torch.load`` for state dicts: open_clip's (plain, or ``{"state_dict": ...}``
    from its trainer with a ``module.`` prefix), and custom-text models whose text keys carry
    ``text.``."""
    p = Path(path)
    if not p.is_file():
        raise missing_weights_error(p, arch)
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript, but OpenAI's RN50.pt exists only as a TorchScript archive.
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(p, map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive
        state = torch_file(p, f"CLIP weights '{p}' (neither OpenAI's TorchScript archive nor a state dict)",
                           "not a CLIP checkpoint")
    state = unwrap_state_dict(state)
    if not isinstance(state, dict):
        raise SegpromptError(f"CLIP weights '{p}' hold a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "token_embedding.weight" not in state:  # open_clip CustomTextCLIP keeps its text tower under `text.`
        state = {k.removeprefix("text."): v for k, v in state.items()}
    return state


class CLIPTextEncoder(TextTransformer):
    """The text tower of CLIP ``arch`` (RN50: 49408x512 token embedding, 77 positions, 12 layers of
    width 512 with 8 heads, causal mask, ``ln_final``, ``text_projection`` 512->1024).

    It is open_clip's :class:`~open_clip.transformer.TextTransformer`, so its state-dict keys are
    OpenAI's text keys. ``quick_gelu`` is on because OpenAI trained CLIP with QuickGELU (open_clip
    builds ``RN50`` with it for the ``openai`` weights). Weights start random (open_clip's init)
    until :meth:`load_pretrained`.
    """

    def __init__(self, arch: str = "RN50", quick_gelu: bool = True):
        embed_dim, cfg = text_config(arch)
        super().__init__(
            context_length=cfg.get("context_length", 77), vocab_size=cfg.get("vocab_size", 49408),
            width=cfg.get("width", 512), heads=cfg.get("heads", 8), layers=cfg.get("layers", 12),
            mlp_ratio=cfg.get("mlp_ratio", 4.0), output_dim=embed_dim,
            act_layer=QuickGELU if quick_gelu else nn.GELU)
        self.arch = arch

    @property
    def tokenizer(self):
        return clip_tokenizer(self.arch)

    def load_pretrained(self, path: str | Path = DEFAULT_WEIGHTS) -> None:
        """Load the text-tower tensors of a local CLIP file; the visual tower and ``logit_scale``
        in it are ignored. Missing or unexpected text keys, or other shapes, are an error listing them."""
        state = read_clip_state_dict(path, self.arch)
        text = {k: v for k, v in state.items() if _is_text_key(k)}
        if not text:
            raise SegpromptError(f"CLIP weights '{path}' hold no CLIP text-tower keys (token_embedding.weight, "
                                 f"transformer.resblocks.*, ln_final.*, text_projection); point clip_weights at "
                                 f"OpenAI's {self.arch}.pt or an open_clip {self.arch} state dict")
        # OpenAI stores float16; loading copies into the module's dtype
        load_strict(self, text, path, self.arch,
                    f"; use OpenAI's {self.arch}.pt or an open_clip {self.arch} state dict",
                    target=f"the {self.arch} text tower", keys="text keys")

    def tokenize(self, names: Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[SOT] name [EOT] 0...`` ids, ``[len(names), context_length]`` (default: the full 77)."""
        return self.tokenizer(list(names), context_length=context_length or self.context_length)

    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """``Tensor[K, embed_dim]``: each bare name through the text tower, as open_clip's
        ``encode_text(tokenize(names))`` (un-normalised)."""
        tokens = self.tokenize(names).to(self.positional_embedding.device)
        return self(tokens)

    def encode_embeddings(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """``Tensor[K, embed_dim]`` from token embeddings ``x: [K, L, width]`` (L <= 77) whose EOT
        token sits at ``eot: [K]``: positional embedding ``[:L]``, transformer under an L x L causal
        mask, ``ln_final`` at EOT, projection."""
        k, length, width = x.shape
        if length > self.context_length or width != self.width:
            raise ValueError(f"token embeddings of shape {tuple(x.shape)} do not fit the {self.arch} text tower "
                             f"(at most {self.context_length} tokens of width {self.width})")
        cast_dtype = self.transformer.get_cast_dtype()
        x = x.to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x[torch.arange(k, device=x.device), eot])
        return x @ self.text_projection
